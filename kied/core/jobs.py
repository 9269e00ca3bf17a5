"""Jobs and their one state table.

A job is kied's record of one KIE task. Every change of state goes through
:func:`advance`, and the store applies the result as a compare-and-set over
:func:`sources`, so that whichever of callback, poller or deadline comes first
wins and every later writer is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final, NewType

from kied.errors import IllegalTransitionError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kied.core._json import JsonObject, JsonValue

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "ArchiveState",
    "ArchivedFile",
    "EndedBy",
    "EventKind",
    "EventType",
    "Job",
    "JobId",
    "JobState",
    "NewJob",
    "Report",
    "TaskId",
    "advance",
    "event_type",
    "is_late",
    "sources",
    "target",
]

JobId = NewType("JobId", str)
TaskId = NewType("TaskId", str)


class JobState(StrEnum):
    SUBMITTING = "submitting"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


#: States a poller still works on.
ACTIVE_STATES: Final = frozenset({JobState.SUBMITTING, JobState.PENDING})
#: States that end polling. ``timed_out`` may still be replaced by a late KIE outcome.
TERMINAL_STATES: Final = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED}
)


class EventKind(StrEnum):
    ACCEPTED = "accepted"  # KIE answered createTask with a task id
    PROGRESS = "progress"  # KIE says the task is still running
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEADLINE = "deadline"  # the job's deadline passed with no outcome
    CANCEL = "cancel"  # the application stopped tracking the job


class EventType(StrEnum):
    """What the application is told happened to a job (the event log)."""

    CREATED = "job.created"
    SUBMITTED = "job.submitted"  # the job has KIE's task id
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    TIMED_OUT = "job.timed_out"
    CANCELLED = "job.cancelled"
    UPDATED = "job.updated"  # a late KIE outcome replaced timed_out
    ARCHIVED = "job.archived"  # every result file of a succeeded job is kept by kied


class ArchiveState(StrEnum):
    """Where a succeeded job's result files stand (``None``: kied does not keep them)."""

    PENDING = "pending"  # to be downloaded and stored, at ``archive_next_at``
    ARCHIVED = "archived"  # every file is stored: ``files``
    FAILED = "failed"  # kied gave up; ``last_error`` says why (``kied archive --retry-failed``)


class EndedBy(StrEnum):
    CALLBACK = "callback"
    #: a callback signed by KIE (its body not authenticated) named the task, and the
    #: outcome is what KIE's status said when asked at once
    CALLBACK_CONFIRMED = "callback_confirmed"
    POLL = "poll"
    SUBMIT = "submit"  # createTask itself was refused
    DEADLINE = "deadline"
    CANCEL = "cancel"


_S = JobState
_E = EventKind

_TRANSITIONS: Final[Mapping[tuple[JobState, EventKind], JobState]] = {
    (_S.SUBMITTING, _E.ACCEPTED): _S.PENDING,
    (_S.SUBMITTING, _E.PROGRESS): _S.PENDING,
    (_S.SUBMITTING, _E.SUCCEEDED): _S.SUCCEEDED,
    (_S.SUBMITTING, _E.FAILED): _S.FAILED,
    (_S.SUBMITTING, _E.DEADLINE): _S.TIMED_OUT,
    (_S.SUBMITTING, _E.CANCEL): _S.CANCELLED,
    (_S.PENDING, _E.ACCEPTED): _S.PENDING,
    (_S.PENDING, _E.PROGRESS): _S.PENDING,
    (_S.PENDING, _E.SUCCEEDED): _S.SUCCEEDED,
    (_S.PENDING, _E.FAILED): _S.FAILED,
    (_S.PENDING, _E.DEADLINE): _S.TIMED_OUT,
    (_S.PENDING, _E.CANCEL): _S.CANCELLED,
    # A KIE outcome that arrives after the deadline still replaces timed_out (marked late).
    (_S.TIMED_OUT, _E.SUCCEEDED): _S.SUCCEEDED,
    (_S.TIMED_OUT, _E.FAILED): _S.FAILED,
    (_S.TIMED_OUT, _E.CANCEL): _S.CANCELLED,
}

# Every event leads to one state whatever it starts from, so a compare-and-set
# on the set of source states is the whole rule.
_TARGETS: Final[Mapping[EventKind, JobState]] = {e: s for (_, e), s in _TRANSITIONS.items()}
_SOURCES: Final[Mapping[EventKind, frozenset[JobState]]] = {
    event: frozenset(s for (s, e) in _TRANSITIONS if e is event) for event in EventKind
}


def advance(state: JobState, event: EventKind) -> JobState:
    """Return the state that ``event`` moves a job in ``state`` to.

    Raises:
        IllegalTransitionError: the table has no such transition (for example any
            event on a succeeded job); nothing is changed.
    """
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransitionError(f"no transition from {state} on {event}") from None


def sources(event: EventKind) -> frozenset[JobState]:
    """The states from which ``event`` may move a job: the compare-and-set guard."""
    return _SOURCES[event]


def target(event: EventKind) -> JobState:
    """The state ``event`` moves a job to from any of :func:`sources`."""
    return _TARGETS[event]


_ENDED: Final[Mapping[JobState, EventType]] = {
    JobState.SUCCEEDED: EventType.SUCCEEDED,
    JobState.FAILED: EventType.FAILED,
    JobState.TIMED_OUT: EventType.TIMED_OUT,
    JobState.CANCELLED: EventType.CANCELLED,
}


def event_type(event: EventKind, after: Job) -> EventType | None:
    """The event the application is told of when ``event`` changed a job to ``after``.

    A job that ends is an event; a late outcome that replaces ``timed_out`` is
    ``job.updated`` (only it can leave ``late`` set on an outcome: outcomes are sticky);
    progress is not.
    """
    ended = _ENDED.get(after.state)
    if ended is None or event not in (
        EventKind.SUCCEEDED,
        EventKind.FAILED,
        EventKind.DEADLINE,
        EventKind.CANCEL,
    ):
        return None
    if after.late and event in (EventKind.SUCCEEDED, EventKind.FAILED):
        return EventType.UPDATED
    return ended


def is_late(state: JobState, event: EventKind) -> bool:
    """Whether applying ``event`` in ``state`` is a KIE outcome arriving after the deadline."""
    return state is JobState.TIMED_OUT and event in (EventKind.SUCCEEDED, EventKind.FAILED)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArchivedFile:
    """One result file kied downloaded and stored."""

    n: int  # its place in the job's ``result_urls``
    key: str  # where the archive keeps it (chosen by kied, never taken from the URL)
    url: str  # where kied serves it: ``{public URL}/v1/jobs/{id}/files/{n}``
    kie_url: str  # where KIE served it
    sha256: str  # hex
    size: int
    content_type: str
    archived_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class NewJob:
    """A job as the application asks for it, before it is stored."""

    id: JobId
    family: str
    model: str | None = None
    task_id: TaskId | None = None
    request: JsonObject | None = None
    metadata: JsonObject | None = None
    idempotency_key: str | None = None
    created_at: float
    deadline_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """kied's record of one KIE task, as stored."""

    id: JobId
    family: str
    model: str | None
    task_id: TaskId | None
    state: JobState
    request: JsonObject | None
    metadata: JsonObject | None
    idempotency_key: str | None
    created_at: float
    updated_at: float
    deadline_at: float
    kie_state: str | None = None
    result_urls: tuple[str, ...] = ()
    result: JsonValue = None
    error_code: str | None = None
    error_message: str | None = None
    ended_by: EndedBy | None = None
    ended_at: float | None = None
    late: bool = False
    last_error: str | None = None
    #: when kied last sent createTask for this job (None: never, or KIE said it did not
    #: create the task); with no ``task_id`` yet, that request's answer is outstanding
    submit_sent_at: float | None = None
    #: createTask requests sent for this job
    submit_count: int = 0
    #: the callback URL the last createTask carried (its secrets redacted)
    submit_callback_url: str | None = None
    #: tasks KIE reported for this job that it does not follow (a createTask answer or a
    #: callback that lost the race to another task): kept, never applied
    other_task_ids: tuple[str, ...] = ()
    #: when a callback whose body authentication does not cover (KIE's signature alone)
    #: last asked for the task's status to be confirmed with KIE; the leader's poller
    #: queries KIE once for each request newer than its last query
    confirm_requested_at: float | None = None
    #: the result files kied keeps (``archive_state`` archived), in ``result_urls`` order
    files: tuple[ArchivedFile, ...] = ()
    archive_state: ArchiveState | None = None
    #: failed tries at archiving since the last success or retry request
    archive_attempts: int = 0
    #: when archiving is next due (pending only)
    archive_next_at: float | None = None
    #: the event held back until the files are kept (``KIED_NOTIFY_AFTER_ARCHIVE``)
    archive_owed_event: EventType | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def submission_in_flight(self) -> bool:
        """A createTask was sent and neither its answer nor its task is known yet."""
        return self.task_id is None and self.submit_sent_at is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One thing learned about a job: from a callback, a poll, the deadline or the application."""

    event: EventKind
    source: EndedBy
    kie_state: str | None = None
    result_urls: tuple[str, ...] = ()
    result: JsonValue = None
    error_code: str | None = None
    error_message: str | None = None
