"""The one path every job change takes once storage has written it.

Storage writes a change and its event in one transaction and says what it changed (see
:class:`~kied.store.JobStore`). Then :meth:`JobChanges.wrote` is the only place that
counts the change, logs it and wakes whoever waits on it: long-poll requests, the event
stream, and the leader's poller supervisor. A change another instance made (PostgreSQL
LISTEN/NOTIFY) wakes the same waiters through :meth:`JobChanges.seen`, and is counted
where it was written.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from kied.core.jobs import TERMINAL_STATES, EndedBy, Job, JobId

if TYPE_CHECKING:
    from collections.abc import Callable

    from kied.core.schedule import CallbackHealth
    from kied.metrics import Metrics

__all__ = ["ChangeListener", "JobChanges"]

logger = logging.getLogger(__name__)

#: Jobs that ended when their callback came: a confirmed callback's outcome is read from
#: KIE at once, so its duration is the callback's.
_BY_CALLBACK = frozenset({EndedBy.CALLBACK, EndedBy.CALLBACK_CONFIRMED})


class ChangeListener(Protocol):
    """Someone who acts on every job change (the poller supervisor)."""

    def job_changed(self, job: Job) -> None: ...


class JobChanges:
    """Counts, logs and announces every job change; see the module docstring."""

    def __init__(
        self, *, metrics: Metrics, health: CallbackHealth, now: Callable[[], float]
    ) -> None:
        self._metrics = metrics
        self._health = health
        self._now = now
        self._per_job: dict[JobId, trio.Event] = {}
        self._any = trio.Event()
        self._stopping = False
        self.listener: ChangeListener | None = None
        #: others who act on every change (the archiver), besides ``listener``
        self.listeners: list[ChangeListener] = []

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop_waiting` was called: waiters answer now instead of waiting."""
        return self._stopping

    def stop_waiting(self) -> None:
        """The daemon is stopping: wake every waiter, and let none wait again.

        Long polls and event streams then answer with what storage holds now, inside the
        HTTP server's graceful drain, instead of being cut off when it ends.
        """
        self._stopping = True
        for event in self._per_job.values():
            event.set()
        self._per_job.clear()
        self._any.set()

    def wrote(self, job: Job, *, ended: bool) -> None:
        """This instance has just written a change of ``job`` (``job`` as written).

        Args:
            job: the job after the write.
            ended: this write ended the job (it is counted once, here).

        Call it synchronously after the write, before the next checkpoint: a terminal
        change then cancels the job's poller before it can query KIE again.
        """
        if ended and job.state in TERMINAL_STATES:
            self._metrics.job_ended(job)
            ended_by = job.ended_by.value if job.ended_by is not None else "-"
            logger.info(
                "[GEN] job %s -> %s (by %s)",
                job.id,
                job.state.value,
                ended_by,
                extra={"action": "job_transition", "job_id": job.id, "state": job.state.value},
            )
            if job.ended_by is EndedBy.POLL and job.ended_at is not None:
                self._health.job_finished(
                    job.family, job.model, job.ended_at - job.created_at, by="poll"
                )
        self.seen(job)

    def seen(self, job: Job) -> None:
        """``job`` changed, here or on another instance: wake whoever waits on it."""
        if job.state in TERMINAL_STATES and job.ended_by in _BY_CALLBACK and job.ended_at:
            # How long jobs take when their callbacks work: seen from every instance.
            self._health.job_finished(
                job.family, job.model, job.ended_at - job.created_at, by="callback"
            )
        event = self._per_job.pop(job.id, None)
        if event is not None:
            event.set()
        self._any.set()
        self._any = trio.Event()
        if self.listener is not None:
            self.listener.job_changed(job)
        for listener in self.listeners:
            listener.job_changed(job)

    def next_change(self, job_id: JobId | None = None) -> trio.Event:
        """An event set at the next change of ``job_id`` (of any job when None) seen here.

        Take it *before* reading storage, then wait on it: a change between the read and
        the wait still sets it. A change on another instance without LISTEN/NOTIFY (SQLite
        shares no process) is not seen: waiters re-read storage now and then anyway. Once
        :meth:`stop_waiting` was called the event is already set.
        """
        if self._stopping:
            already = trio.Event()
            already.set()
            return already
        if job_id is None:
            return self._any
        event = self._per_job.get(job_id)
        if event is None:
            event = self._per_job[job_id] = trio.Event()
        return event
