"""The storage interface every backend implements, and the records it trades in."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

    from kied.core._json import JsonObject
    from kied.core.jobs import ArchivedFile, Job, JobId, NewJob, Report, TaskId
    from kied.core.schedule import FinishedBy

__all__ = [
    "ArchiveMode",
    "Attached",
    "CallbackEffect",
    "CallbackHistory",
    "CallbackRecord",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryState",
    "Event",
    "Finish",
    "InboxEntry",
    "JobStore",
    "ListeningSpan",
    "NewDelivery",
    "Prunable",
    "PruneKind",
    "StoredCallback",
]


#: ``off``: result files are not kept; ``on``: they are; ``notify-after``: they are, and a
#: job's ``job.succeeded`` is written once they are kept (or kied gave up on them)
ArchiveMode = Literal["off", "on", "notify-after"]


@dataclass(frozen=True, slots=True, kw_only=True)
class InboxEntry:
    """One callback as received, before it is stored. Nothing here is ever dropped."""

    received_at: float
    body: bytes  # at most the configured bound; body_size tells what was sent
    body_size: int
    content_type: str | None
    query: str  # the query string, with any token removed
    remote: str | None
    task_id: TaskId | None
    found_by: str | None  # where the task id was found, e.g. "data.taskId"
    job_id: JobId | None  # kied's own job id, from the callback URL
    outcome: str  # success | fail | pending | unknown
    problem: str | None  # why the body could not be read: "oversized", "invalid JSON", ...
    authenticated: bool
    auth: str  # "token", "hmac", "token+hmac", "open", or why it was rejected
    #: the request's headers (lower-case names), secrets shown as ``***``
    headers: Mapping[str, str] | None = None
    body_sha256: str | None = None  # of the whole body as sent, hex
    #: the entry's id in the local journal; a second entry with the same id is not stored
    journal_id: str | None = None


class CallbackEffect(StrEnum):
    CHANGED = "changed"  # the callback moved its job
    NO_OP = "no-op"  # the job was already past what the callback says
    NO_JOB = "no job"  # no job matches (yet): kept for when one is created with that task id
    REJECTED = "rejected"  # not authenticated: changes nothing
    NOT_APPLICABLE = "not applicable"  # nothing to apply (unknown outcome)
    # The job follows another task, or the callback names none: a job ends only from its
    # own task. The task id is kept in the job's ``other_task_ids``.
    OTHER_TASK = "other task"
    # Authenticated by KIE's signature alone, which does not cover the body: the job's
    # ``confirm_requested_at`` is set and the leader asks KIE for the task's status.
    CONFIRMING = "to confirm"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackRecord:
    """What storing a callback did."""

    inbox_id: int
    effect: CallbackEffect
    job: Job | None  # the job the callback names, as it stands after the callback
    #: the callback gave a job still waiting for createTask's answer its task id
    adopted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Attached:
    """What recording a task id did."""

    job: Job  # the job as it stands after the write
    #: this write ended the job: an outcome that came first, in a callback no job matched
    #: then, was applied
    ended: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One row of the event log: something the application is told about a job.

    Written in the same transaction as the job's change (a transactional outbox): no
    event without its change, no change without its event.
    """

    #: increases with every event, in commit order: resuming after a cursor misses none
    cursor: int
    id: str  # "evt_…", stable
    type: str  # an EventType value
    created_at: float
    job_id: JobId
    job: JsonObject  # the job as the API showed it when the event was written


class DeliveryState(StrEnum):
    PENDING = "pending"  # an attempt is due (now or later)
    DELIVERED = "delivered"  # the endpoint answered 2xx
    FAILED = "failed"  # out of attempts, or the endpoint is gone (410): a dead letter


@dataclass(frozen=True, slots=True, kw_only=True)
class NewDelivery:
    """One event to send to one endpoint."""

    event_id: str
    event_cursor: int
    job_id: JobId
    type: str
    endpoint: str
    body: str  # the JSON body, signed and sent as it is on every attempt
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One event's delivery to one endpoint, as stored."""

    id: int
    event_id: str
    event_cursor: int
    job_id: JobId
    type: str
    endpoint: str
    body: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    last_status: int | None
    last_error: str | None
    delivered_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryAttempt:
    """One try at a delivery: what the endpoint answered, or why there was no answer."""

    delivery_id: int
    attempted_at: float
    status_code: int | None
    duration_s: float
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredCallback:
    """An inbox row, as read back."""

    id: int
    entry: InboxEntry
    effect: CallbackEffect
    matched_job_id: JobId | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListeningSpan:
    """An instance of kied accepted callbacks from ``since`` until at least ``until``."""

    instance: str
    since: float
    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish:
    """A job that ended by callback or by poll, as :class:`CallbackHistory` remembers it."""

    family: str
    model: str | None
    #: ``callback`` (a callback's outcome, confirmed or not) or ``poll``
    by: FinishedBy
    created_at: float
    ended_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackHistory:
    """What storage says of how callbacks have been doing, to seed a new leader's estimate."""

    #: when the newest authenticated callback was received; None: none is kept
    last_callback_at: float | None
    #: the jobs that ended most recently by callback or poll, oldest first
    finishes: tuple[Finish, ...]


class PruneKind(StrEnum):
    """What retention deletes, each by its own time."""

    JOBS = "jobs"  # ended jobs, by ended_at; never an unfinished one
    DELIVERIES = "deliveries"  # webhook deliveries and their attempts, by created_at
    INBOX = "inbox"  # callback inbox rows, by received_at
    EVENTS = "events"  # the event log, by created_at
    #: webhook signatures seen (the replay cache), by seen_at; kept for twice their window
    SIGNATURES = "signatures"


@dataclass(frozen=True, slots=True, kw_only=True)
class Prunable:
    """What pruning one kind would delete now."""

    count: int
    #: the oldest such row's time (the time it is pruned by); None when there is none
    oldest: float | None


class JobStore(Protocol):
    """Durable jobs and the callback inbox.

    Every state change is a compare-and-set guarded by :func:`kied.core.jobs.sources`:
    terminal states are sticky and repeating any write is a no-op.
    """

    async def ping(self) -> None:
        """Return when storage answers; raise ``StoreUnavailableError`` otherwise."""
        ...

    async def create_job(self, new: NewJob) -> tuple[Job, bool]:
        """Store a new job; ``(job, True)``.

        A job with the same ``idempotency_key`` (or, for a tracked task, the same
        ``task_id``) already stored is returned as ``(existing, False)``. When the job
        carries a task id and the inbox already holds an authenticated callback for it
        that no job matched, its outcome is applied at once.
        """
        ...

    async def get_job(self, job_id: JobId) -> Job | None: ...

    async def get_job_by_task(self, task_id: TaskId) -> Job | None: ...

    async def list_jobs(
        self,
        *,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs, newest first, optionally only those in ``states``.

        ``metadata``: only jobs whose metadata has every key with that value: the string
        itself, or a number or boolean whose JSON text it is (``42``, ``true``).
        """
        ...

    async def unfinished_jobs(self) -> list[Job]:
        """Every job in ``submitting`` or ``pending``, oldest deadline first."""
        ...

    async def attach_task(self, job_id: JobId, task_id: TaskId, *, now: float) -> Attached | None:
        """Record KIE's task id for a job and move it to ``pending`` (event ``accepted``).

        Returns what the write did, or ``None`` when no such job exists. An inbox
        callback for that task id that arrived first is applied, as in :meth:`create_job`.
        A job that already follows another task keeps it: ``task_id`` is added to its
        ``other_task_ids`` and the job is returned otherwise unchanged (the caller sees
        ``job.task_id != task_id``).

        Raises:
            ConflictError: another job follows ``task_id``.
        """
        ...

    async def begin_submission(
        self, job_id: JobId, *, count: int, callback_url: str | None, now: float
    ) -> Job | None:
        """Record that createTask is about to be sent for a job; commit before sending it.

        A compare-and-set on ``count`` (the job's ``submit_count`` as the caller read it):
        it succeeds only while the job is ``submitting`` with no task id and nobody else
        began a submission since, so two leaders never both send one.

        The first submission (``count == 0``) also moves ``deadline_at`` later by
        ``now - created_at``, the time the job waited in kied's createTask queue: a job's
        timeout counts from when kied sends it. Later ones leave the deadline alone.

        Returns:
            The job with ``submit_sent_at = now`` and ``submit_count = count + 1`` (and
            its deadline moved, the first time), or ``None`` when the compare-and-set did
            not match (send nothing).
        """
        ...

    async def end_submission(self, job_id: JobId, *, count: int, now: float) -> None:
        """KIE answered submission ``count`` without creating a task: it is no longer in flight."""
        ...

    async def apply(self, job_id: JobId, report: Report, *, now: float) -> Job | None:
        """Apply ``report`` as a compare-and-set.

        Returns the job as written when the write changed it, ``None`` when it was a
        no-op (unknown job, or a state the event does not apply to).
        """
        ...

    async def note_error(self, job_id: JobId, message: str, *, now: float) -> None:
        """Keep the latest poller error on the job, as a fact for operators."""
        ...

    async def record_callback(self, entry: InboxEntry, report: Report | None) -> CallbackRecord:
        """Store one callback and, when it is authenticated, apply ``report`` to its job.

        The job is found by ``entry.task_id`` first, then by ``entry.job_id``. It changes
        only when the callback's task is the job's own, or when the job has no task yet
        (it adopts the callback's); otherwise the effect is ``OTHER_TASK`` and the task id
        goes to the job's ``other_task_ids``. A callback that names no task never changes
        a job. The inbox row and the job's change commit together.

        A callback authenticated by KIE's signature alone (``entry.auth == "hmac"``) does
        not apply ``report``: its body is not authenticated. The job may adopt its task
        as above, and an unfinished (or timed out) job gets ``confirm_requested_at =
        entry.received_at``: the effect is ``CONFIRMING``. So does an early callback of
        that kind once its job is created or given its task.
        """
        ...

    async def remember_signature(self, digest: str, *, seen_at: float) -> bool:
        """Remember a webhook signature's digest; True when it was not known yet.

        One insert that ignores a repeat, so of callbacks that carry the same signature,
        on any instance, exactly one sees True.
        """
        ...

    async def prune_signatures(self, *, before: float, limit: int) -> int:
        """Forget at most ``limit`` of the oldest signatures seen before ``before``; how many.

        A signature passes only while its timestamp is within ``webhook_max_skew_s`` of
        the time it arrives, so one seen more than twice that long ago can never pass
        again: ``before = now - 2 * webhook_max_skew_s`` forgets nothing that matters.
        """
        ...

    async def list_callbacks(
        self, *, task_id: TaskId | None = None, job_id: JobId | None = None, limit: int = 100
    ) -> list[StoredCallback]:
        """Inbox rows, newest first; only those for ``task_id``, or matched to or naming
        ``job_id`` (its callback trail), when given."""
        ...

    async def list_events(self, *, after: int = 0, limit: int = 100) -> list[Event]:
        """Events with a cursor above ``after``, oldest first."""
        ...

    async def prune_events(self, *, before: float, limit: int) -> int:
        """Delete at most ``limit`` of the oldest events written before ``before``; how many."""
        ...

    # -- retention (the leader's pruner, ``kied prune``) ---------------------------------

    async def prune_jobs(self, *, before: float, limit: int) -> list[JobId]:
        """Delete at most ``limit`` of the jobs that ended before ``before``, the oldest
        end first, in one transaction; the ids of those deleted.

        An unfinished job is never deleted. Inbox rows matched to a deleted job keep
        their row, with no match. A deleted job's kept files are listed in
        :meth:`archive_trash`, in the same transaction.
        """
        ...

    async def prune_deliveries(self, *, before: float, limit: int) -> int:
        """Delete at most ``limit`` of the webhook deliveries created before ``before``,
        oldest first, with their attempts, in one transaction; how many. A pending
        delivery is never deleted."""
        ...

    async def prune_inbox(self, *, before: float, limit: int) -> int:
        """Delete at most ``limit`` of the inbox rows received before ``before``, oldest
        first, in one transaction; how many. A callback still waiting for its job goes
        too: it is older than any job that could still be created for its task."""
        ...

    async def count_prunable(self, kind: PruneKind, *, before: float) -> Prunable:
        """What pruning ``kind`` with ``before`` would delete now, in all batches."""
        ...

    # -- archived result files (the leader's archiver) -----------------------------------

    async def set_archive_mode(self, mode: ArchiveMode) -> None:
        """Whether jobs that succeed from now on are archived (``on``), and their
        ``job.succeeded`` held back until then (``notify-after``), or not (``off``).

        The mode is kept in storage, shared by every instance: the write that ends a job
        marks it ``pending`` in the same transaction.
        """
        ...

    async def due_archives(self, *, now: float, limit: int) -> list[Job]:
        """Jobs whose files are pending and due by ``now``, the longest due first."""
        ...

    async def next_archive_at(self) -> float | None:
        """When the next pending archiving is due; None when none is pending."""
        ...

    async def pending_archives(self) -> int:
        """How many jobs have files pending."""
        ...

    async def finish_archive(
        self, job_id: JobId, files: Sequence[ArchivedFile], *, now: float
    ) -> Job | None:
        """Record a pending job's kept files: ``archived``, with ``job.archived`` (after
        the event held back for it, if any), in one transaction. None when the job is not
        pending (a no-op)."""
        ...

    async def fail_archive(
        self, job_id: JobId, error: str, *, next_at: float | None, now: float
    ) -> Job | None:
        """Record a failed try at a pending job's files in ``last_error``: try again at
        ``next_at``, or give up (``failed``, and the event held back is written) when it
        is None. None when the job is not pending (a no-op)."""
        ...

    async def retry_archives(self, job_ids: Collection[JobId] | None, *, now: float) -> list[JobId]:
        """Archive again, now: these succeeded jobs (with result URLs, not pending), or
        every ``failed`` one when ``job_ids`` is None; the ids marked pending."""
        ...

    async def archive_trash(self, *, limit: int) -> list[tuple[JobId, list[str]]]:
        """Deleted jobs whose kept files are still to be deleted: their archive keys."""
        ...

    async def forget_archive_trash(self, job_ids: Collection[JobId]) -> None:
        """These deleted jobs' files are gone from the archive."""
        ...

    # -- webhook deliveries (the leader's notifier) -------------------------------------

    async def enqueue_deliveries(self, deliveries: Sequence[NewDelivery], *, cursor: int) -> int:
        """Store new deliveries (a repeat of an event and endpoint is ignored) and move the
        notifier's cursor up to ``cursor``, in one transaction; how many were new."""
        ...

    async def webhook_cursor(self) -> int:
        """The cursor of the last event the notifier turned into deliveries (0 at first)."""
        ...

    async def due_deliveries(
        self, *, now: float, limit: int, per_endpoint: int = 100
    ) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, the longest due first; at most
        ``per_endpoint`` of each endpoint's."""
        ...

    async def next_delivery_at(self) -> float | None:
        """When the next pending delivery is due, or None when none is pending."""
        ...

    async def record_attempt(
        self, attempt: DeliveryAttempt, *, state: DeliveryState, next_attempt_at: float | None
    ) -> None:
        """Record an attempt and what follows: delivered, failed, or the next attempt's time."""
        ...

    async def list_deliveries(
        self,
        *,
        state: DeliveryState | None = None,
        event_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        """Deliveries, newest first; ``since``: created at or after."""
        ...

    async def list_attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        """A delivery's attempts, oldest first."""
        ...

    async def redeliver(
        self, *, event_id: str | None = None, failed_since: float | None = None, now: float
    ) -> int:
        """Send again, from the first attempt: the deliveries of ``event_id``, or those that
        failed and were created at or after ``failed_since``. Their endpoints are enabled
        again. How many."""
        ...

    async def disable_endpoint(self, endpoint: str, *, reason: str, now: float) -> int:
        """Stop sending to ``endpoint`` (it answered 410): its pending deliveries fail, and
        no new ones are made until a redelivery enables it. How many failed."""
        ...

    async def disabled_endpoints(self) -> dict[str, str]:
        """Disabled endpoints, with why."""
        ...

    async def heard_listening(self, instance: str, *, since: float, now: float) -> None:
        """Record that ``instance`` has accepted callbacks from ``since`` until ``now``.

        Each instance calls it now and then while it listens; the spans tell a new leader
        whether callbacks may have come while no instance listened.
        """
        ...

    async def listening_spans(self, *, after: float) -> list[ListeningSpan]:
        """The spans of the instances that listened at some time after ``after``, by
        ``since``; older ones are deleted."""
        ...

    async def callback_history(self, *, limit: int) -> CallbackHistory:
        """The newest authenticated callback's time and the ``limit`` newest finishes."""
        ...

    async def aclose(self) -> None:
        """Close connections and threads. Idempotent."""
        ...
