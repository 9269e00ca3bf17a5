"""The poller supervisor and the job pollers: the safety net under KIE's callbacks.

While ACTIVE, the supervisor keeps exactly one poller per unfinished job. Each poller
runs in its own cancel scope, kept in a registry: a callback that records a terminal
state cancels that job's poller at once, and the job's stored deadline is a scope too.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from typing import TYPE_CHECKING, NamedTuple, Protocol

import trio
import trio.lowlevel

from kied.api import callback_url
from kied.core.families import Family
from kied.core.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    EndedBy,
    EventKind,
    Job,
    JobId,
    JobState,
    Report,
    TaskId,
)
from kied.core.outcomes import outcome_report
from kied.core.schedule import (
    CallbackHealth,
    PollBudget,
    PollPolicy,
    backoff_delay,
    budget_window,
    fleet_idle,
    planned_poll_delay,
    poll_weight,
    share_interval_s,
)
from kied.core.views import iso
from kied.errors import (
    ConflictError,
    StoreError,
    UpstreamBusyError,
    UpstreamError,
    UpstreamRejectedError,
)
from kied.kie.client import STATUS_LIMIT

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from kied.changes import JobChanges
    from kied.core import JsonObject
    from kied.kie.client import TaskStatus
    from kied.metrics import Metrics
    from kied.settings import Settings
    from kied.store import JobStore

__all__ = [
    "GC_FREEZE_JOBS",
    "LOST_SUBMISSION",
    "NOT_SENT",
    "UNKNOWN_TASK",
    "KieApi",
    "PollerSupervisor",
]

logger = logging.getLogger(__name__)

_OUTCOMES = (EventKind.SUCCEEDED, EventKind.FAILED)
#: pollers between reading storage and KIE's answer at once (twice KIE's status rate)
_QUERY_SLOTS = 20
#: pollers started in one go by a rescan
_START_CHUNK = 500
#: how long storing createTask's answer is retried while storage fails
_ATTACH_BOUND_S = 10.0
#: a createTask, once sent, gets this long to be answered and its task id stored (the
#: client's own request timeout is 30 s); after it the sender gives up
_SEND_BOUND_S = 30.0 + _ATTACH_BOUND_S
#: by then a createTask's sender, on any instance, has stored its answer or given up
_ANSWER_BOUND_S = _SEND_BOUND_S + 5.0
#: while waiting for a lost createTask's callback, storage is read again this often
_LOST_RECHECK_S = 30.0
#: ``error.code`` of a job whose createTask answer was lost and whose task never called back
LOST_SUBMISSION = "submission_lost"
#: a confirming status query that finds no outcome yet is asked again after this, then
#: twice as long, this many times (KIE's status may lag behind its callback)
_CONFIRM_RETRY_S = 2.0
_CONFIRM_RETRIES = 4
#: taking over at least this many unfinished jobs, the leader freezes what it loaded out of
#: the garbage collector's sight (``gc.freeze``): a full collection would otherwise walk
#: every job, poller and cancel scope again and again (tens of ms a time at 100,000 jobs,
#: stalling callbacks meanwhile), while those objects live until their jobs end. Below a
#: quarter of it they are handed back (``gc.unfreeze``), so that cycles among ended
#: pollers are collected.
GC_FREEZE_JOBS = 10_000
#: ``error.code`` of a job whose task KIE did not know for ``unknown_task_grace_s``
UNKNOWN_TASK = "unknown_task"
#: ... and when asked at least this many times in a row: one odd answer fails no job
_UNKNOWN_ANSWERS = 3
#: ``error.code`` of a job that timed out in kied's own createTask queue, never sent to KIE
NOT_SENT = "not_sent"
#: shares of the budget shorter than this change no plan (KIE's own schedule is slower)
_SHARE_FLOOR_S = 0.5
#: sleeping pollers are woken to plan again at most this often
_REPLAN_MIN_S = 1.0


class _Plan(NamedTuple):
    """A job's next status query as planned: when the plan was made (trio time), the part
    of the planned delay to wait (1, or a random part for a job taken over), and whether it
    is the job's first query on this instance. Small: 100,000 sleeping pollers keep one."""

    made_at: float
    part: float
    first: bool


class _SupersededError(Exception):
    """The job changed between reading it and sending createTask: read it again."""


class _StoppingError(Exception):
    """The daemon is stopping: no new createTask is sent."""


def _lost_report(job: Job, *, by_deadline: bool) -> Report:
    sent_at = job.submit_sent_at
    when = "" if sent_at is None else f" at {iso(sent_at)}"
    why = (
        "no callback named the task it may have created before the deadline"
        if by_deadline
        else "with no public URL (KIED_PUBLIC_URL) no callback can name the task it may have created"
    )
    return Report(
        event=EventKind.DEADLINE if by_deadline else EventKind.FAILED,
        source=EndedBy.DEADLINE if by_deadline else EndedBy.SUBMIT,
        error_code=LOST_SUBMISSION,
        error_message=(
            f"the answer to the createTask sent{when} was lost (kied stopped, or KIE did not"
            f" answer); {why}; it was not created again, so as not to pay twice"
            " (KIED_RESUBMIT=never)"
        ),
    )


class KieApi(Protocol):
    """What the pollers need of KIE (the client, or a fake in tests)."""

    async def create_task(
        self,
        family: Family,
        *,
        model: str | None,
        input: JsonObject,
        callback_url: str | None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> TaskId: ...

    async def get_status(self, family: Family, task_id: TaskId) -> TaskStatus: ...


class PollerSupervisor:
    """One poller per unfinished job, while this instance leads.

    Every poller plans its next status query against the fleet's budget
    (``KIED_STATUS_QUERIES_PER_S``, :func:`~kied.core.schedule.planned_poll_delay`): KIE's
    own schedule while few jobs are in flight, stretched as more share the budget, overdue
    jobs first. The client's rate limiter stays the hard cap; the plan is what keeps the
    queue at it short.

    Args:
        unheard_before: when this instance takes over, jobs created before this (wall clock)
            may have ended while no instance listened for callbacks (see
            :mod:`kied.listening`); the leader queries them first, oldest first, at the
            budget's pace. None: callbacks were heard throughout, and the jobs it takes
            over keep their schedule.
    """

    def __init__(
        self,
        *,
        store: JobStore,
        kie: KieApi,
        settings: Settings,
        now: Callable[[], float],
        health: CallbackHealth,
        changes: JobChanges,
        metrics: Metrics,
        policy: PollPolicy | None = None,
        rng: random.Random | None = None,
        rescan_s: float = 30.0,
        unheard_before: float | None = None,
    ) -> None:
        self._store = store
        self._kie = kie
        self._settings = settings
        self._now = now
        self._health = health
        self._changes = changes
        self._metrics = metrics
        self._policy = policy or PollPolicy()
        self._rng = rng or random.Random()
        self._rescan_s = rescan_s
        self._scopes: dict[JobId, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._rescan_now = trio.Event()
        self._query_slots = trio.CapacityLimiter(_QUERY_SLOTS)
        #: createTask requests sent and not yet answered, each in its shielded scope
        self._sending: set[trio.CancelScope] = set()
        #: set when the daemon stops: no createTask is sent after it, none outlives it
        self._stop_deadline: float | None = None
        #: jobs whose createTask answer was lost, waiting for their task: since when
        self._lost: dict[JobId, float] = {}
        self._wakeups: dict[JobId, trio.Event] = {}
        #: the newest request to confirm each polled job's task status (a callback whose
        #: body is not authenticated), as last seen in storage
        self._confirms: dict[JobId, float] = {}
        #: timed-out jobs whose late callback is being confirmed now
        self._late_confirms: set[JobId] = set()
        #: status queries sent, by result, for operators
        self.status_queries: dict[str, int] = {}
        self._budget = PollBudget(settings.status_queries_per_s)
        #: the budget as KIE's client keeps it (a hard cap): queries per window
        self._budget_window = budget_window(settings.status_queries_per_s)
        self._unheard_before = unheard_before
        #: catch-up queries planned (jobs that may have ended unheard), and when they began
        self._catch_ups = 0
        self._catch_up_t0 = 0.0
        #: jobs waiting in kied's createTask queue (never sent to KIE yet)
        self._queued: set[JobId] = set()
        #: what the plans of sleeping pollers assumed: callbacks healthy, the fleet idle,
        #: the budget's share
        self._planned_for: tuple[bool, bool, float] | None = None
        self._plan_epoch = 0
        self._replanned_at = -math.inf
        self._replan_pending = False
        #: pollers sleeping until a planned query (their wake-up events are in _wakeups)
        self._sleeping: set[JobId] = set()
        self._frozen = False

    @property
    def polling(self) -> int:
        """How many pollers run now."""
        return len(self._scopes)

    @property
    def budget(self) -> tuple[float, float]:
        """The status-query budget (a second), and the shortest interval an overdue job gets
        under it now (:func:`~kied.core.schedule.share_interval_s`)."""
        return self._budget.per_s, self._budget.share_s()

    def job_changed(self, job: Job) -> None:
        """A job was stored or changed: stop its poller, or start one.

        Called synchronously by whoever changed the job (a callback, the API, a poller),
        so that a terminal callback cancels the poller before the next checkpoint.
        """
        wake = self._wakeups.pop(job.id, None)
        if wake is not None:
            wake.set()
        if job.task_id is not None:
            self._found_lost_task(job)
        if job.state in TERMINAL_STATES:
            scope = self._scopes.get(job.id)
            if scope is not None:
                scope.cancel(reason=f"job {job.state.value}")
            if job.state is JobState.TIMED_OUT:
                self._confirm_late(job)
        elif job.state in ACTIVE_STATES and self._nursery is not None:
            self._note_confirm(job)  # kept while the job's poller runs
            self._start(job)
        self._replan_if_changed()

    def stop_creating(self, deadline: float) -> None:
        """The daemon is stopping: send no new createTask, and give up waiting for the
        answers of those in flight at ``deadline`` (trio time)."""
        self._stop_deadline = deadline
        for scope in self._sending:
            scope.deadline = min(scope.deadline, deadline)

    def _found_lost_task(self, job: Job) -> None:
        # A job whose createTask answer was lost has its task: the task's callback named
        # it, or the previous leader stored the answer after all.
        waiting_since = self._lost.pop(job.id, None)
        if waiting_since is None:
            return
        self._metrics.lost_submission("adopted")
        logger.info(
            "[GEN] job %s: found its task %s %.1f s after taking over its lost createTask",
            job.id,
            job.task_id,
            self._now() - waiting_since,
            extra={"action": "task_adopted", "job_id": job.id, "task_id": job.task_id},
        )

    def _wake_event(self, job_id: JobId) -> trio.Event:
        event = self._wakeups.get(job_id)
        if event is None:
            event = self._wakeups[job_id] = trio.Event()
        return event

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
                await self._rescan(taking_over=True)
                task_status.started()
                while True:
                    with trio.move_on_after(self._rescan_s):
                        await self._rescan_now.wait()
                    self._rescan_now = trio.Event()
                    await self._rescan()
            finally:
                self._nursery = None
                self._thaw()

    def _replan_if_changed(self) -> None:
        """Wake every sleeping poller to plan its next query again, when the plans they
        sleep on no longer fit: callbacks turned healthy or stopped being so, the fleet
        turned idle or busy (:func:`~kied.core.schedule.fleet_idle`), or the budget's share
        halved or doubled (jobs ended or came). So a fresh daemon's first plans (made
        before any callback was heard) are not kept once callbacks are seen to work, and
        jobs left in flight get the budget that ended ones freed. O(1) unless it wakes
        them, at most once every ``_REPLAN_MIN_S``."""
        healthy = self._callbacks_expected()
        load = self._budget.load()
        idle = fleet_idle(load.jobs, self._budget.per_s, self._policy)
        share = max(share_interval_s(load, self._budget.per_s), _SHARE_FLOOR_S)
        planned = self._planned_for
        if planned is None:
            self._planned_for = (healthy, idle, share)
            return
        was_healthy, was_idle, was_share = planned
        if (healthy, idle) == (was_healthy, was_idle) and was_share / 2 < share < was_share * 2:
            return
        now = trio.current_time()
        if now < self._replanned_at + _REPLAN_MIN_S:
            if not self._replan_pending and self._nursery is not None:
                self._replan_pending = True  # looked at again once the interval is over
                self._nursery.start_soon(self._replan_later)
            return
        self._planned_for = (healthy, idle, share)
        self._replanned_at = now
        self._plan_epoch += 1
        if self._nursery is not None:
            self._nursery.start_soon(self._wake_sleepers, list(self._sleeping))

    async def _wake_sleepers(self, job_ids: list[JobId]) -> None:
        # In chunks, as a rescan starts pollers: 100,000 pollers woken in one go would
        # hold every callback for as long as they take to plan again.
        for n, job_id in enumerate(job_ids, 1):
            wake = self._wakeups.pop(job_id, None)
            if wake is not None:
                wake.set()
            if n % _START_CHUNK == 0:
                await trio.lowlevel.checkpoint()

    async def _replan_later(self) -> None:
        await trio.sleep_until(self._replanned_at + _REPLAN_MIN_S)
        self._replan_pending = False
        self._replan_if_changed()

    def request_rescan(self) -> None:
        """Look through storage for unfinished jobs now (wake-ups may have been lost)."""
        self._rescan_now.set()

    async def _rescan(self, *, taking_over: bool = False) -> None:
        try:
            jobs = await self._store.unfinished_jobs()
        except StoreError as exc:
            logger.error("[GEN] cannot load unfinished jobs: %s", exc)
            return
        unheard_before = self._unheard_before if taking_over else None
        if unheard_before is not None:
            # Oldest first: the likelier to have ended unheard, the sooner it is asked.
            jobs.sort(key=lambda job: job.created_at)
        # Every job is counted in the fleet's load before any poller plans, so that the
        # pollers started first (500 at a time) plan against all of them, rather than
        # against a load that doubles and doubles, each time waking them all.
        fresh = [
            (job, unheard_before is not None and job.created_at < unheard_before)
            for job in jobs
            if job.id not in self._scopes
        ]
        for job, unheard in fresh:
            self._weigh(job, unheard=unheard)
        started = caught_up = 0
        for job, unheard in fresh:
            if self._start(job, resumed=taking_over, unheard=unheard, weighed=True):
                started += 1
                caught_up += unheard
                if started % _START_CHUNK == 0:
                    # Let the pollers started so far settle before starting more: a leader
                    # taking over 100,000 jobs must not stall the callback route meanwhile.
                    await trio.lowlevel.checkpoint()
        if started:
            logger.info("[GEN] polling %d unfinished job(s)", started)
        if caught_up:
            logger.info(
                "[GEN] %d job(s) may have ended while no instance listened for callbacks"
                " (created before %s): querying them first, %g a second",
                caught_up,
                iso(unheard_before or 0.0),
                self._budget.per_s,
                extra={"action": "catch_up", "jobs": caught_up},
            )
        self._budget.resum()
        self._replan_if_changed()  # and callbacks may have gone quiet since the last rescan
        if taking_over and len(jobs) >= GC_FREEZE_JOBS:
            gc.freeze()
            self._frozen = True
        elif len(self._scopes) < GC_FREEZE_JOBS // 4:
            self._thaw()

    def _weigh(self, job: Job, *, unheard: bool) -> None:
        """Count a job in the fleet's load before its poller has planned: a job still being
        created weighs as a new one, one that may have ended unheard as an overdue one."""
        if job.task_id is None:
            weight = 1.0 / self._policy.overdue_weight
        elif unheard:
            weight = 1.0
        else:
            typical_s = self._health.typical_duration_s(job.family, job.model)
            weight = poll_weight(self._now() - job.created_at, typical_s, self._policy)
        self._budget.weigh(job.id, weight)

    def _thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

    def _note_confirm(self, job: Job) -> None:
        requested = job.confirm_requested_at
        if requested is not None and requested > self._confirms.get(job.id, -math.inf):
            self._confirms[job.id] = requested

    def _start(
        self, job: Job, *, resumed: bool = False, unheard: bool = False, weighed: bool = False
    ) -> bool:
        """Start the job's poller, unless it has one. ``weighed``: the job is counted in
        the fleet's load already (a rescan counts all it starts first)."""
        if self._nursery is None or job.id in self._scopes:
            return False
        self._note_confirm(job)
        scope = trio.CancelScope()
        self._scopes[job.id] = scope
        # Counted in the fleet's load at once, so that the jobs an application submits in
        # a burst plan against all of them, not against those started before them.
        if not weighed:
            self._weigh(job, unheard=unheard)
        first_at: float | None = None
        if job.task_id is not None and unheard:
            # It may have ended while nobody listened: at once, in the order the jobs are
            # started (oldest first), as fast as KIE lets a key query (ten at a time) until
            # the budget's window is spent, then again once it has passed: the pace the
            # client's limiter lets them through, so none waits in its queue.
            if self._catch_ups == 0:
                self._catch_up_t0 = trio.current_time()
            burst, kie_window_s = STATUS_LIMIT
            budget_limit, budget_window_s = self._budget_window
            windows, nth = divmod(self._catch_ups, budget_limit)
            first_at = self._catch_up_t0 + windows * budget_window_s + (nth // burst) * kie_window_s
            self._catch_ups += 1
        self._nursery.start_soon(self._poll, job, scope, resumed, first_at)
        return True

    def _plan(self, job: Job, *, first: bool, age_s: float | None = None) -> float:
        """Plan the job's next status query against the budget: the delay from when the
        job was ``age_s`` old (default: now)."""
        healthy = self._callbacks_expected()
        delay, weight = planned_poll_delay(
            self._now() - job.created_at if age_s is None else age_s,
            typical_duration_s=self._health.typical_duration_s(job.family, job.model),
            load=self._budget.load(),
            budget_per_s=self._budget.per_s,
            callbacks_healthy=healthy,
            first=first,
            policy=self._policy,
            jitter=self._rng.random(),
        )
        self._budget.weigh(job.id, weight)
        return delay

    def _new_plan(self, *, first: bool, resumed: bool = False) -> _Plan:
        """A plan of the job's next query made now; :meth:`_planned_at` gives its time.

        ``resumed``: another leader followed the job until now, so its first query comes
        somewhere in its interval, and the jobs taken over are not all asked at once.
        """
        return _Plan(trio.current_time(), self._rng.random() if resumed else 1.0, first)

    def _planned_at(self, job: Job, plan: _Plan) -> float:
        """When (trio time) ``plan`` has the job queried, with what is known now of the fleet
        and of callbacks: :meth:`_wait_to_poll` asks again when the fleet changes."""
        made_at_wall = self._now() - (trio.current_time() - plan.made_at)
        age_s = made_at_wall - job.created_at
        return plan.made_at + plan.part * self._plan(job, first=plan.first, age_s=age_s)

    async def _poll(
        self,
        job: Job,
        scope: trio.CancelScope,
        resumed: bool = False,
        first_at: float | None = None,
    ) -> None:
        try:
            with scope:
                # The job's stored deadline is this scope's own: a restart does not
                # restart the clock, and one scope per poller keeps 100,000 of them cheap.
                scope.deadline = trio.current_time() + max(0.0, job.deadline_at - self._now())
                await self._poll_until_terminal(job, resumed=resumed, first_at=first_at)
            if scope.cancelled_caught and trio.current_time() >= scope.deadline:
                report = Report(event=EventKind.DEADLINE, source=EndedBy.DEADLINE)
                if job.id in self._lost:
                    report = _lost_report(job, by_deadline=True)
                elif job.id in self._queued:
                    report = self._not_sent_report(job)
                await self._finish(job, report)
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
            self._lost.pop(job.id, None)
            self._queued.discard(job.id)
            if self._scopes.get(job.id) is scope:
                del self._scopes[job.id]
                self._confirms.pop(job.id, None)
                self._budget.forget(job.id)
                self._replan_if_changed()
            logger.debug("[GEN] poller for job %s stopped", job.id)

    def _not_sent_report(self, job: Job) -> Report:
        waited_s = self._now() - job.created_at
        return Report(
            event=EventKind.DEADLINE,
            source=EndedBy.DEADLINE,
            error_code=NOT_SENT,
            error_message=(
                f"waited {waited_s:.0f} s in kied's createTask queue (KIE takes 20 new tasks"
                " per 10 s from a key) and was never sent: the job's deadline, or"
                f" KIED_CREATE_QUEUE_MAX ({self._settings.create_queue_max_s:g} s), passed first"
            ),
        )

    async def _poll_until_terminal(
        self, job: Job, *, resumed: bool = False, first_at: float | None = None
    ) -> None:
        """Follow one job to its end: create its task if need be, then query KIE as
        planned. ``resumed``: taken over from another leader; ``first_at``: when (trio
        time) to query it first, if it may have ended unheard."""
        family = Family(job.family)
        if job.task_id is None:
            submitted = await self._submit(job, family)
            if submitted is None:
                return
            job = submitted
            resumed, first_at = False, None  # its task is new: nothing was missed
        task_id = job.task_id
        assert task_id is not None
        policy = self._policy
        plan: _Plan | None = None
        if first_at is None:
            plan = self._new_plan(first=True, resumed=resumed)
            next_at = self._planned_at(job, plan)
        else:
            next_at = first_at
        failures = 0
        kie_state = job.kie_state
        #: the confirm request the last status query answered (see _confirm_due)
        confirmed: float | None = None
        unconfirmed = 0  # confirming queries in a row that found no outcome yet
        # Since when, and how many times in a row, KIE has answered that it has no record
        # of the task (it may take a moment to know a task it has just created).
        unknown_since: float | None = None
        unknown_answers = 0
        while True:
            await self._wait_to_poll(job, next_at, confirmed, plan)
            plan = None
            # Few pollers at a time go from storage to KIE: the rate limit (and the budget)
            # lets ten status queries through a second at most, and the rest wait here
            # without holding anything.
            async with self._query_slots:
                current = await self._store.get_job(job.id)  # storage first
                if current is None or current.state not in ACTIVE_STATES:
                    return
                self._note_confirm(current)
                if self._confirm_due(job.id, confirmed):
                    unconfirmed = 0
                confirming = unconfirmed < _CONFIRM_RETRIES and (
                    unconfirmed > 0 or self._confirm_due(job.id, confirmed)
                )
                # This query answers every request made before it is sent.
                confirmed = self._confirms.get(job.id)
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
            if reading is None:
                unknown_answers += 1
                if unknown_since is None:
                    unknown_since = trio.current_time()
                    await self._note(
                        job.id,
                        f"KIE does not know task {task_id}"
                        f" (status query answered {status.answer or 'no record'})",
                    )
                give_up_at = unknown_since + self._settings.unknown_task_grace_s
                if trio.current_time() >= give_up_at and unknown_answers >= _UNKNOWN_ANSWERS:
                    unknown = self._unknown_report(task_id, unknown_answers, status)
                    logger.warning(
                        "[GEN] job %s failed: %s",
                        job.id,
                        unknown.error_message,
                        extra={"action": "unknown_task", "job_id": job.id, "task_id": task_id},
                    )
                    await self._finish(job, unknown)
                    return
            else:
                unknown_since = None
                unknown_answers = 0
                report = outcome_report(
                    reading.outcome,
                    source=EndedBy.CALLBACK_CONFIRMED if confirming else EndedBy.POLL,
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
                    progressed = await self._store.apply(job.id, report, now=self._now())
                    if progressed is not None:
                        self._changes.wrote(progressed, ended=False)
            if not confirming and unknown_since is None:
                # The plan is made again whenever the fleet changes while it sleeps.
                plan = self._new_plan(first=False)
                next_at = self._planned_at(job, plan)
            else:
                delay = self._plan(job, first=False)
                if confirming:
                    # KIE's status may lag behind its callback a little: ask again soon.
                    delay = min(delay, _CONFIRM_RETRY_S * 2**unconfirmed)
                    unconfirmed += 1
                next_at = trio.current_time() + delay
                if unknown_since is not None and trio.current_time() < give_up_at:
                    # Asked again at the end of the grace, so an unknown task ends on time.
                    next_at = min(next_at, give_up_at)

    def _confirm_due(self, job_id: JobId, confirmed: float | None) -> bool:
        """Whether a callback asked to confirm the job's task status since the request
        ``confirmed`` was answered. Requests are compared with requests, never with this
        instance's clock, so another instance's clock does not matter."""
        requested = self._confirms.get(job_id)
        return requested is not None and (confirmed is None or requested > confirmed)

    async def _wait_to_poll(
        self, job: Job, next_at: float, confirmed: float | None, plan: _Plan | None = None
    ) -> None:
        """Sleep until ``next_at`` (trio time), or until a callback asks to confirm.

        With ``plan``, the time is planned again whenever the fleet changes enough
        (:meth:`_replan_if_changed`): sooner or later, as the new plan says.
        """
        job_id = job.id
        epoch = self._plan_epoch
        try:
            while not self._confirm_due(job_id, confirmed):
                if plan is not None and epoch != self._plan_epoch:
                    epoch = self._plan_epoch
                    next_at = self._planned_at(job, plan)
                if trio.current_time() >= next_at:
                    break
                wake = self._wake_event(job_id)
                if plan is not None:
                    self._sleeping.add(job_id)
                with trio.move_on_at(next_at):
                    await wake.wait()
        finally:
            self._sleeping.discard(job_id)
        await trio.lowlevel.checkpoint()

    def _confirm_late(self, job: Job) -> None:
        """A timed-out job's callback asked to confirm its task's status: query KIE once,
        as a poller would, since a late outcome still replaces ``timed_out``."""
        requested = job.confirm_requested_at
        if (
            self._nursery is None
            or requested is None
            or job.task_id is None
            or job.ended_at is None
            or requested <= job.ended_at  # asked while the job was still polled
            or job.id in self._late_confirms
        ):
            return
        self._late_confirms.add(job.id)
        self._nursery.start_soon(self._query_late, job, job.task_id)

    async def _query_late(self, job: Job, task_id: TaskId) -> None:
        try:
            await self._confirm_once(job, task_id)
        except Exception:
            # A fact about this job, never the supervisor's end.
            logger.exception("[GEN] confirming the late callback of job %s failed", job.id)
        finally:
            self._late_confirms.discard(job.id)

    async def _confirm_once(self, job: Job, task_id: TaskId) -> None:
        try:
            async with self._query_slots:
                status = await self._kie.get_status(Family(job.family), task_id)
        except UpstreamError as exc:
            self._count(_failure(exc))
            await self._note(job.id, f"status query for a late callback failed: {exc}")
            return
        reading = status.reading
        self._count("unknown task" if reading is None else reading.outcome.value)
        if reading is None:
            return
        report = outcome_report(
            reading.outcome,
            source=EndedBy.CALLBACK_CONFIRMED,
            kie_state=reading.kie_state,
            result_urls=reading.result_urls,
            error_code=reading.error_code,
            error_message=reading.error_message,
        )
        if report is not None and report.event in _OUTCOMES:
            await self._finish(job, report)

    def _unknown_report(self, task_id: TaskId, answers: int, status: TaskStatus) -> Report:
        grace_s = self._settings.unknown_task_grace_s
        return Report(
            event=EventKind.FAILED,
            source=EndedBy.POLL,
            error_code=UNKNOWN_TASK,
            error_message=(
                f"KIE does not know task {task_id}: {answers} status queries in a row over"
                f" {grace_s:g} s (KIED_UNKNOWN_TASK_GRACE) answered that it has no record of"
                f" it, the last: {status.answer or 'no record'}"
            ),
        )

    async def _submit(self, job: Job, family: Family) -> Job | None:
        """Create the KIE task for a stored job; the job with its task id, or None if it ended.

        One createTask at a time per job, across instances: it is recorded in storage (a
        compare-and-set) before it is sent, and once sent it runs to its answer even while
        this instance stops, so that its task id is stored. A createTask whose answer was
        lost (a previous leader stopped, or KIE did not answer) is resolved by
        :meth:`_resolve_lost` and never sent again without the setting saying so.

        A job's timeout counts from its first createTask: while it waits for one in kied's
        queue (the rate limiter), its poller's scope ends no sooner than
        ``create_queue_max_s`` after the job was created; once it is sent, storage has
        moved ``deadline_at`` by that wait and the scope follows it.
        """
        if job.task_id is None and job.submit_count == 0:
            # Before the first checkpoint, so that a stored deadline already past (a
            # restart after a long wait in the queue) does not end the wait here.
            self._move_deadline(
                job.id, max(job.deadline_at, job.created_at + self._settings.create_queue_max_s)
            )
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
        failures = 0
        while True:
            current = await self._store.get_job(job.id)
            if current is None or current.state not in ACTIVE_STATES:
                return None
            if current.task_id is not None:  # a callback named the task first
                return current
            if current.submission_in_flight:
                resolved = await self._resolve_lost(current)
                if resolved is None or resolved.task_id is not None:
                    return resolved
                if resolved.submit_count != current.submit_count:
                    continue  # another leader sent one meanwhile: look at that one
                current = resolved  # KIED_RESUBMIT=after-wait: create it again
            sent = await self._send_create(current, family, payload, failures=failures)
            if not isinstance(sent, float):
                return sent
            if sent > 0:
                failures += 1
                await trio.sleep(sent)

    async def _send_create(
        self, job: Job, family: Family, payload: JsonObject, *, failures: int
    ) -> Job | float | None:
        """Send one createTask for ``job``; the job as it stands after the answer (None if it
        ended), or how long to wait before the next try (0: read the job again now)."""
        count = job.submit_count
        url = callback_url(self._settings, job.id)
        with trio.CancelScope() as sending:

            async def before_send() -> None:
                # The rate limiter has let the request through: record it, then send it.
                self._queued.discard(job.id)
                if self._stop_deadline is not None:
                    raise _StoppingError
                marked = await self._store.begin_submission(
                    job.id,
                    count=count,
                    callback_url=callback_url(self._settings, job.id, redacted=True),
                    now=self._now(),
                )
                if marked is None:
                    raise _SupersededError  # the job changed, or another leader sent one
                # The first createTask moved the stored deadline by the wait in the queue.
                self._move_deadline(job.id, marked.deadline_at)
                # From here the request runs to its answer: abandoning it once sent is what
                # leaves KIE with a task nobody follows. A stop bounds it (stop_creating).
                sending.shield = True
                sending.deadline = min(sending.deadline, trio.current_time() + _SEND_BOUND_S)
                self._sending.add(sending)

            if count == 0:
                self._queued.add(job.id)  # waits in kied's queue, never sent yet
            try:
                task_id = await self._kie.create_task(
                    family,
                    model=job.model,
                    input=payload,
                    callback_url=url,
                    before_send=before_send,
                )
            except (_SupersededError, _StoppingError):
                return 0.0 if self._stop_deadline is None else None
            except UpstreamBusyError as exc:
                self._metrics.create_task("busy")
                if exc.outcome_unknown:
                    # KIE may have created the task: this is a lost answer now.
                    await self._note(
                        job.id, f"createTask got no answer (KIE may have created the task): {exc}"
                    )
                    return 0.0
                # KIE answered that it did not take the request (429, 455, 5xx): try again.
                await self._note(job.id, f"createTask failed: {exc}")
                await self._store.end_submission(job.id, count=count + 1, now=self._now())
                return backoff_delay(
                    failures + 1,
                    self._policy,
                    jitter=self._rng.random(),
                    retry_after_s=exc.retry_after_s,
                )
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
            finally:
                self._sending.discard(sending)
            return await self._store_task(job, task_id)
        # The bound passed before KIE answered (or before its answer could be stored):
        # the submission stays in flight, and is resolved as a lost one.
        logger.warning(
            "[GEN] job %s: gave up waiting for createTask's answer; its task's callback may"
            " still name the job",
            job.id,
        )
        return 0.0

    def _move_deadline(self, job_id: JobId, deadline_at: float) -> None:
        """Set the job's poller scope to end at ``deadline_at`` (wall clock)."""
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.deadline = trio.current_time() + max(0.0, deadline_at - self._now())

    async def _store_task(self, job: Job, task_id: TaskId) -> Job | None:
        """Store the task id createTask answered; retried while storage fails, bounded."""
        attached: Job | None = None
        with trio.move_on_after(_ATTACH_BOUND_S):
            delay = 0.1
            while True:
                try:
                    attachment = await self._store.attach_task(job.id, task_id, now=self._now())
                except ConflictError:
                    attached = await self._store.get_job(job.id)
                except StoreError as exc:
                    logger.warning(
                        "[GEN] job %s: cannot store task %s yet: %s", job.id, task_id, exc
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                else:
                    if attachment is not None:
                        attached = attachment.job
                        # An outcome that came first, in a callback no job matched then,
                        # may have been applied by this write: then it ended the job here.
                        self._changes.wrote(attached, ended=attachment.ended)
                break
        self._metrics.create_task("created")
        if attached is None:
            logger.error(
                "[GEN] job %s: KIE created task %s but it could not be stored; its callback"
                " will name the job",
                job.id,
                task_id,
            )
            return None
        if attached.task_id != task_id:
            # A callback named the job's task before createTask answered with this one.
            self._metrics.other_task("create")
            logger.warning(
                "[GEN] job %s: createTask answered task %s after the job took task %s;"
                " %s is kept in other_task_ids and not followed",
                job.id,
                task_id,
                attached.task_id,
                task_id,
                extra={"action": "other_task", "job_id": job.id, "task_id": task_id},
            )
        else:
            logger.info(
                "[GEN] job %s -> KIE task %s",
                job.id,
                task_id,
                extra={"action": "task_created", "job_id": job.id},
            )
        if attached.state not in ACTIVE_STATES:
            return None
        return attached

    async def _resolve_lost(self, job: Job) -> Job | None:
        """Resolve a createTask whose answer was lost; never send it again unless told to.

        The task's callback names the job, so it adopts the task whenever it comes. With
        no public URL no callback can come. Otherwise this waits for it: until the job's
        deadline (``KIED_RESUBMIT=never``, the poller's own scope ends the wait), or
        ``resubmit_wait_s`` after the lost request was sent (``after-wait``).

        Returns:
            The job with its task id (adopted), the job to create again (``after-wait``),
            or None when the job ended (given up under ``never``, or ended elsewhere).
        """
        sent_at = job.submit_sent_at
        assert sent_at is not None
        settings = self._settings
        # Its sender (a leader that lost the lock, or is stopping) may still store the
        # answer until then.
        answer_by = sent_at + _ANSWER_BOUND_S
        if settings.public_url is None:
            wait_until = answer_by  # then nothing can name the task
        elif settings.resubmit == "after-wait":
            wait_until = max(answer_by, sent_at + settings.resubmit_wait_s)
        else:
            wait_until = math.inf
        waited_from = self._now()
        self._lost[job.id] = waited_from
        if wait_until > waited_from:
            bound = (
                "the job's deadline"
                if math.isinf(wait_until)
                else f"{wait_until - waited_from:.0f} s"
            )
            await self._note(
                job.id,
                f"createTask sent at {iso(sent_at)} got no answer; waiting up to {bound} for"
                " the callback of the task it may have created",
            )
        try:
            resolved = await self._await_task(job, wait_until)
        finally:
            self._wakeups.pop(job.id, None)
        if resolved is not None:
            current = resolved[0]
            if current is not None and current.task_id is not None:
                self._found_lost_task(current)
            self._lost.pop(job.id, None)
            if current is None or current.state not in ACTIVE_STATES:
                return None
            return current
        # In _lost only while waiting: a deadline that cancels the wait finds it there.
        self._lost.pop(job.id, None)
        if settings.resubmit == "after-wait":
            self._metrics.lost_submission("recreated")
            logger.warning(
                "[GEN] job %s: no callback named the task of the createTask sent at %s;"
                " creating it again (KIED_RESUBMIT=after-wait): KIE may now run two tasks",
                job.id,
                iso(sent_at),
                extra={"action": "task_recreated", "job_id": job.id},
            )
            return job
        await self._finish(job, _lost_report(job, by_deadline=False))
        return None

    async def _await_task(self, job: Job, wait_until: float) -> tuple[Job | None] | None:
        """Wait until ``wait_until`` (wall clock) for a job with a lost createTask to change.

        Returns ``(job,)`` as it stands once it has a task id, ended, or another submission
        began (``(None,)`` if it is gone); ``None`` when the wait ran out.
        """
        while (remaining := wait_until - self._now()) > 0:
            wake = self._wake_event(job.id)
            with trio.move_on_after(min(remaining, _LOST_RECHECK_S)):
                await wake.wait()
            current = await self._store.get_job(job.id)
            if (
                current is None
                or current.task_id is not None
                or current.state not in ACTIVE_STATES
                or current.submit_count != job.submit_count
            ):
                return (current,)
        return None

    async def _finish(self, job: Job, report: Report) -> None:
        # The terminal write must land even while the scope is being cancelled.
        changed = None
        with trio.move_on_after(self._settings.cleanup_s, shield=True):
            changed = await self._store.apply(job.id, report, now=self._now())
        if changed is None:
            return
        if report.error_code == LOST_SUBMISSION:
            self._metrics.lost_submission("given_up")
        self._changes.wrote(changed, ended=True)

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
