"""The poller supervisor and the job pollers: the safety net under KIE's callbacks.

While ACTIVE, the supervisor keeps exactly one poller per unfinished job. Each poller
runs in its own cancel scope, kept in a registry: a callback that records a terminal
state cancels that job's poller at once, and the job's stored deadline is a scope too.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Protocol

import trio
import trio.lowlevel

from kied.core.families import Family
from kied.core.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    EndedBy,
    EventKind,
    Job,
    JobId,
    Report,
    TaskId,
)
from kied.core.outcomes import outcome_report
from kied.core.schedule import (
    CallbackHealth,
    PollPolicy,
    backoff_delay,
    first_poll_delay,
    next_poll_delay,
)
from kied.errors import (
    ConflictError,
    StoreError,
    UpstreamBusyError,
    UpstreamError,
    UpstreamRejectedError,
)
from kied.jobs import callback_url

if TYPE_CHECKING:
    from collections.abc import Callable

    from kied.core._json import JsonObject
    from kied.kie.client import TaskStatus
    from kied.metrics import Metrics
    from kied.settings import Settings
    from kied.store import JobStore

__all__ = ["KieApi", "PollerSupervisor"]

logger = logging.getLogger(__name__)

_OUTCOMES = (EventKind.SUCCEEDED, EventKind.FAILED)
#: pollers between reading storage and KIE's answer at once (twice KIE's status rate)
_QUERY_SLOTS = 20
#: pollers started in one go by a rescan
_START_CHUNK = 500


class KieApi(Protocol):
    """What the pollers need of KIE (the client, or a fake in tests)."""

    async def create_task(
        self, family: Family, *, model: str | None, input: JsonObject, callback_url: str | None
    ) -> TaskId: ...

    async def get_status(self, family: Family, task_id: TaskId) -> TaskStatus: ...


class PollerSupervisor:
    """One poller per unfinished job, while this instance leads."""

    def __init__(
        self,
        *,
        store: JobStore,
        kie: KieApi,
        settings: Settings,
        now: Callable[[], float],
        health: CallbackHealth,
        on_change: Callable[[Job], None],
        metrics: Metrics,
        policy: PollPolicy | None = None,
        rng: random.Random | None = None,
        rescan_s: float = 30.0,
    ) -> None:
        self._store = store
        self._kie = kie
        self._settings = settings
        self._now = now
        self._health = health
        self._on_change = on_change
        self._metrics = metrics
        self._policy = policy or PollPolicy()
        self._rng = rng or random.Random()
        self._rescan_s = rescan_s
        self._scopes: dict[JobId, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._rescan_now = trio.Event()
        self._query_slots = trio.CapacityLimiter(_QUERY_SLOTS)
        #: status queries sent, by result, for operators
        self.status_queries: dict[str, int] = {}

    @property
    def polling(self) -> int:
        """How many pollers run now."""
        return len(self._scopes)

    def job_changed(self, job: Job) -> None:
        """A job was stored or changed: stop its poller, or start one.

        Called synchronously by whoever changed the job (a callback, the API, a poller),
        so that a terminal callback cancels the poller before the next checkpoint.
        """
        if job.state in TERMINAL_STATES:
            scope = self._scopes.get(job.id)
            if scope is not None:
                scope.cancel(reason=f"job {job.state.value}")
        elif job.state in ACTIVE_STATES:
            self._start(job)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a poller for every unfinished job, then keep them going until cancelled.

        A periodic rescan of storage starts pollers for jobs this instance was not told
        about (a lost wake-up, a job created elsewhere).

        Cancellation: cancelling it (losing leadership) cancels every poller; the next
        leader resumes them from storage with their stored deadlines.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._rescan()
                task_status.started()
                while True:
                    with trio.move_on_after(self._rescan_s):
                        await self._rescan_now.wait()
                    self._rescan_now = trio.Event()
                    await self._rescan()
            finally:
                self._nursery = None

    def request_rescan(self) -> None:
        """Look through storage for unfinished jobs now (wake-ups may have been lost)."""
        self._rescan_now.set()

    async def _rescan(self) -> None:
        try:
            jobs = await self._store.unfinished_jobs()
        except StoreError as exc:
            logger.error("[GEN] cannot load unfinished jobs: %s", exc)
            return
        started = 0
        for job in jobs:
            if self._start(job):
                started += 1
                if started % _START_CHUNK == 0:
                    # Let the pollers started so far settle before starting more: a leader
                    # taking over 100,000 jobs must not stall the callback route meanwhile.
                    await trio.lowlevel.checkpoint()
        if started:
            logger.info("[GEN] polling %d unfinished job(s)", started)

    def _start(self, job: Job) -> bool:
        if self._nursery is None or job.id in self._scopes:
            return False
        scope = trio.CancelScope()
        self._scopes[job.id] = scope
        self._nursery.start_soon(self._poll, job, scope)
        return True

    async def _poll(self, job: Job, scope: trio.CancelScope) -> None:
        try:
            with scope:
                # The job's stored deadline is this scope's own: a restart does not
                # restart the clock, and one scope per poller keeps 100,000 of them cheap.
                scope.deadline = trio.current_time() + max(0.0, job.deadline_at - self._now())
                await self._poll_until_terminal(job)
            if scope.cancelled_caught and trio.current_time() >= scope.deadline:
                await self._finish(job, Report(event=EventKind.DEADLINE, source=EndedBy.DEADLINE))
        except Exception as exc:
            # A poller's failure is a fact about its job, never the daemon's end; the
            # next rescan starts a new poller.
            logger.exception("[GEN] poller for job %s failed", job.id)
            with trio.move_on_after(self._settings.cleanup_s, shield=True):
                try:
                    await self._store.note_error(job.id, f"poller failed: {exc!r}", now=self._now())
                except StoreError:
                    pass
        finally:
            if self._scopes.get(job.id) is scope:
                del self._scopes[job.id]
            logger.debug("[GEN] poller for job %s stopped", job.id)

    async def _poll_until_terminal(self, job: Job) -> None:
        family = Family(job.family)
        if job.task_id is None:
            submitted = await self._submit(job, family)
            if submitted is None:
                return
            job = submitted
        task_id = job.task_id
        assert task_id is not None
        policy = self._policy
        since_created = self._now() - job.created_at
        first = first_poll_delay(
            policy,
            callbacks_healthy=self._callbacks_expected(),
            typical_duration_s=self._health.typical_duration_s(job.family, job.model),
            jitter=self._rng.random(),
        )
        next_at = trio.current_time() + max(0.0, first - since_created)
        failures = 0
        kie_state = job.kie_state
        while True:
            await trio.sleep_until(next_at)
            # Few pollers at a time go from storage to KIE: the rate limit lets ten status
            # queries through a second, and the rest wait here without holding anything.
            async with self._query_slots:
                current = await self._store.get_job(job.id)  # storage first
                if current is None or current.state not in ACTIVE_STATES:
                    return
                try:
                    status = await self._kie.get_status(family, task_id)
                except UpstreamError as exc:
                    error: UpstreamError | None = exc
                else:
                    error = None
            if error is not None:
                failures += 1
                self._count(_failure(error))
                await self._note(job.id, f"status query failed: {error}")
                retry_after = error.retry_after_s if isinstance(error, UpstreamBusyError) else None
                delay = backoff_delay(
                    failures, policy, jitter=self._rng.random(), retry_after_s=retry_after
                )
                next_at = trio.current_time() + delay
                continue
            failures = 0
            reading = status.reading
            self._count("unknown task" if reading is None else reading.outcome.value)
            if reading is not None:
                report = outcome_report(
                    reading.outcome,
                    source=EndedBy.POLL,
                    kie_state=reading.kie_state,
                    result_urls=reading.result_urls,
                    error_code=reading.error_code,
                    error_message=reading.error_message,
                )
                if report is not None and report.event in _OUTCOMES:
                    await self._finish(job, report)
                    return
                if report is not None and (
                    reading.kie_state != kie_state or current.state != "pending"
                ):
                    kie_state = reading.kie_state
                    await self._store.apply(job.id, report, now=self._now())
            elapsed = self._now() - job.created_at
            next_at = trio.current_time() + next_poll_delay(
                elapsed,
                policy,
                jitter=self._rng.random(),
                callbacks_healthy=self._callbacks_expected(),
            )

    async def _submit(self, job: Job, family: Family) -> Job | None:
        """Create the KIE task for a stored job; the job with its task id, or None if it ended."""
        request = job.request or {}
        payload = request.get("input")
        if not isinstance(payload, dict):
            await self._finish(
                job,
                Report(
                    event=EventKind.FAILED,
                    source=EndedBy.SUBMIT,
                    error_code="invalid",
                    error_message="the job has no input to send to KIE",
                ),
            )
            return None
        url = callback_url(self._settings, job.id)
        failures = 0
        while True:
            current = await self._store.get_job(job.id)
            if current is None or current.state not in ACTIVE_STATES:
                return None
            if current.task_id is not None:  # a callback named the task first
                return current
            try:
                task_id = await self._kie.create_task(
                    family, model=job.model, input=payload, callback_url=url
                )
            except UpstreamBusyError as exc:
                # KIE dropped the request (429, 455, 5xx) or did not answer: try again.
                self._metrics.create_task("busy")
                failures += 1
                await self._note(job.id, f"createTask failed: {exc}")
                await trio.sleep(
                    backoff_delay(
                        failures,
                        self._policy,
                        jitter=self._rng.random(),
                        retry_after_s=exc.retry_after_s,
                    )
                )
                continue
            except UpstreamError as exc:
                # Refused, or accepted without a task id to follow: creating it again
                # could start a second generation, so the job ends here.
                self._metrics.create_task(_failure(exc))
                code = exc.code if isinstance(exc, UpstreamRejectedError) else "no task id"
                message = exc.message if isinstance(exc, UpstreamRejectedError) else str(exc)
                report = Report(
                    event=EventKind.FAILED,
                    source=EndedBy.SUBMIT,
                    error_code=str(code),
                    error_message=message,
                )
                logger.error("[GEN] job %s: KIE refused the task: %s", job.id, exc)
                await self._finish(job, report)
                return None
            self._metrics.create_task("created")
            attached_at = self._now()
            try:
                attached = await self._store.attach_task(job.id, task_id, now=attached_at)
            except ConflictError:
                attached = await self._store.get_job(job.id)
            else:
                if (
                    attached is not None
                    and attached.state in TERMINAL_STATES
                    and attached.ended_by is EndedBy.CALLBACK
                    and attached.ended_at == attached_at
                ):
                    # The attach applied a callback that had matched no job, at the
                    # attach's own time: this write ended the job. A job a callback ended
                    # first (here or at another instance) carries that callback's time,
                    # and was counted where it was written.
                    self._metrics.job_ended(attached)
            logger.info(
                "[GEN] job %s -> KIE task %s",
                job.id,
                task_id,
                extra={"action": "task_created", "job_id": job.id},
            )
            if attached is None or attached.state not in ACTIVE_STATES:
                if attached is not None:
                    self._on_change(attached)
                return None
            return attached

    async def _finish(self, job: Job, report: Report) -> None:
        # The terminal write must land even while the scope is being cancelled.
        changed = None
        with trio.move_on_after(self._settings.cleanup_s, shield=True):
            changed = await self._store.apply(job.id, report, now=self._now())
        if changed is None:
            return
        self._metrics.job_ended(changed)
        logger.info(
            "[GEN] job %s -> %s (by %s)",
            job.id,
            changed.state.value,
            report.source.value,
            extra={"action": "job_transition", "job_id": job.id, "state": changed.state.value},
        )
        if report.source is EndedBy.POLL and changed.ended_at is not None:
            self._health.job_finished(
                job.family, job.model, changed.ended_at - job.created_at, by="poll"
            )
        self._on_change(changed)

    async def _note(self, job_id: JobId, message: str) -> None:
        logger.warning("[GEN] job %s: %s", job_id, message)
        try:
            await self._store.note_error(job_id, message, now=self._now())
        except StoreError:
            pass

    def _callbacks_expected(self) -> bool:
        return self._settings.public_url is not None and self._health.healthy(self._now())

    def _count(self, result: str) -> None:
        self.status_queries[result] = self.status_queries.get(result, 0) + 1
        self._metrics.status_query(result)


def _failure(exc: UpstreamError) -> str:
    """How a call to KIE failed, as counted: busy (try again), rejected, or error."""
    if isinstance(exc, UpstreamBusyError):
        return "busy"
    if isinstance(exc, UpstreamRejectedError):
        return "rejected"
    return "error"
