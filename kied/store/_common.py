"""What the database stores share: how jobs, reports and inbox rows are held in columns."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final, LiteralString

from kied.core.auth import body_is_authenticated
from kied.core.jobs import (
    TERMINAL_STATES,
    ArchivedFile,
    ArchiveState,
    EndedBy,
    EventKind,
    EventType,
    Job,
    JobId,
    JobState,
    NewJob,
    Report,
    TaskId,
    target,
)
from kied.core.views import job_view
from kied.store._base import CallbackEffect, Event, InboxEntry, PruneKind, StoredCallback

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from kied.core._json import JsonObject, JsonValue

__all__ = [
    "ARCHIVE_GIVE_UP",
    "ARCHIVE_LATER",
    "ARCHIVE_TRASH",
    "BEGIN_ARCHIVE",
    "BEGIN_SUBMISSION",
    "CALLBACK_COLUMNS",
    "CONFIRMABLE_STATES",
    "COUNT_PRUNABLE",
    "DUE_ARCHIVES",
    "END_SUBMISSION",
    "EVENT_COLUMNS",
    "FINISH_ARCHIVE",
    "FORGET_ARCHIVE_TRASH",
    "INSERT_ARCHIVE_TRASH",
    "INSERT_EVENT",
    "JOB_COLUMNS",
    "JOURNALED_CALLBACK",
    "LIST_CALLBACKS_FOR_JOB",
    "LIST_CALLBACKS_FOR_TASK_AND_JOB",
    "LIST_EVENTS",
    "MAX_OTHER_TASKS",
    "NEXT_ARCHIVE_AT",
    "NO_REPORT",
    "PENDING_ARCHIVES",
    "PRUNE_DELIVERIES",
    "PRUNE_EVENTS",
    "PRUNE_INBOX",
    "PRUNE_JOBS",
    "PRUNE_SIGNATURES",
    "PUT_STATE",
    "REMEMBER_SIGNATURE",
    "REQUEST_CONFIRM",
    "RETRY_ARCHIVE",
    "RETRY_FAILED_ARCHIVES",
    "SET_OTHER_TASKS",
    "WAITING_CALLBACK_COLUMNS",
    "apply_statements",
    "check_limit",
    "confirms_only",
    "end_archive",
    "entry_values",
    "event_from_row",
    "event_values",
    "files_from_json",
    "files_to_json",
    "for_psycopg",
    "job_from_row",
    "match_callback",
    "metadata_matches",
    "new_event_id",
    "new_job_values",
    "other_tasks_value",
    "report_values",
    "stored_callback_from_row",
    "trash_keys",
    "waiting_report",
]

# The order of each column list is the order the row readers below unpack.
JOB_COLUMNS: Final[LiteralString] = (
    "id, family, model, task_id, state, request, metadata, idempotency_key, created_at,"
    " updated_at, deadline_at, kie_state, result_urls, result, error_code, error_message,"
    " ended_by, ended_at, late, last_error, submit_sent_at, submit_count, submit_callback_url,"
    " other_task_ids, confirm_requested_at, files, archive_state, archive_attempts,"
    " archive_next_at, archive_owed_event"
)
CALLBACK_COLUMNS: Final[LiteralString] = (
    "id, received_at, body, body_size, content_type, query, remote, task_id, found_by, job_id,"
    " outcome, problem, authenticated, auth, effect, matched_job_id, headers, body_sha256,"
    " journal_id"
)
EVENT_COLUMNS: Final[LiteralString] = "cursor, id, type, created_at, job_id, job"
# Statements both databases read alike, written with SQLite's :name parameters;
# for_psycopg() gives PostgreSQL's %(name)s form.
SET_OTHER_TASKS: Final[LiteralString] = (
    "UPDATE jobs SET other_task_ids = :other_task_ids, updated_at = :now WHERE id = :id"
)

#: The first createTask moves the deadline by the time the job waited for it in kied's own
#: queue (from created_at): a job's timeout counts from when kied sends it to KIE. SET
#: expressions read the row as it was, so ``submit_count = 0`` means "the first".
BEGIN_SUBMISSION: Final[LiteralString] = (
    "UPDATE jobs SET submit_sent_at = :now, submit_count = submit_count + 1,"
    " submit_callback_url = :callback_url, updated_at = :now,"
    " deadline_at = CASE WHEN submit_count = 0 AND :now > created_at"
    " THEN deadline_at + (:now - created_at) ELSE deadline_at END"
    " WHERE id = :id AND state = 'submitting' AND task_id IS NULL AND submit_count = :count"
    " RETURNING " + JOB_COLUMNS
)

END_SUBMISSION: Final[LiteralString] = (
    "UPDATE jobs SET submit_sent_at = NULL, updated_at = :now"
    " WHERE id = :id AND task_id IS NULL AND submit_count = :count"
)

LIST_CALLBACKS_FOR_JOB: Final[LiteralString] = (
    "SELECT " + CALLBACK_COLUMNS + " FROM callback_inbox"
    " WHERE matched_job_id = :job_id OR job_id = :job_id ORDER BY id DESC LIMIT :limit"
)

LIST_CALLBACKS_FOR_TASK_AND_JOB: Final[LiteralString] = (
    "SELECT " + CALLBACK_COLUMNS + " FROM callback_inbox WHERE task_id = :task_id"
    " AND (matched_job_id = :job_id OR job_id = :job_id) ORDER BY id DESC LIMIT :limit"
)

INSERT_EVENT: Final[LiteralString] = (
    "INSERT INTO events (id, type, created_at, job_id, job)"
    " VALUES (:id, :type, :created_at, :job_id, :job)"
)

#: The inbox row a journal entry was stored as, if it was.
JOURNALED_CALLBACK: Final[LiteralString] = (
    "SELECT id, effect, matched_job_id FROM callback_inbox WHERE journal_id = :journal_id"
)

LIST_EVENTS: Final[LiteralString] = (
    "SELECT " + EVENT_COLUMNS + " FROM events WHERE cursor > :after ORDER BY cursor LIMIT :limit"
)

PRUNE_EVENTS: Final[LiteralString] = (
    "DELETE FROM events WHERE cursor IN"
    " (SELECT cursor FROM events WHERE created_at < :before ORDER BY cursor LIMIT :limit)"
)

# Retention. Each kind is deleted oldest first by the index on its time (migration 5 for
# jobs and the inbox), a batch per transaction. A job with ended_at is terminal; the state
# is checked all the same, so that an unfinished job is never deleted. Deleting a job sets
# its inbox rows' matched_job_id to NULL (ON DELETE SET NULL); deleting a delivery deletes
# its attempts (ON DELETE CASCADE).
PRUNE_JOBS: Final[LiteralString] = (
    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE ended_at < :before"
    " AND state NOT IN ('submitting', 'pending') ORDER BY ended_at LIMIT :limit)"
    " RETURNING id, files"
)
#: A deleted job's kept files, for the pruner to delete from the archive.
INSERT_ARCHIVE_TRASH: Final[LiteralString] = (
    "INSERT INTO archive_trash (job_id, files) VALUES (:job_id, :files)"
    " ON CONFLICT (job_id) DO NOTHING"
)
ARCHIVE_TRASH: Final[LiteralString] = (
    "SELECT job_id, files FROM archive_trash ORDER BY job_id LIMIT :limit"
)
FORGET_ARCHIVE_TRASH: Final[LiteralString] = "DELETE FROM archive_trash WHERE job_id = :job_id"

# Archiving. The mode ('off', 'on', 'notify-after') is kept in kied_state, where every
# statement that ends a job sees it: a job that succeeds with result URLs while it is on
# is marked pending, in the same transaction, and with 'notify-after' its event is held
# back (archive_owed_event) until the files are kept or kied gives up on them.
PUT_STATE: Final[LiteralString] = (
    "INSERT INTO kied_state (name, value) VALUES (:name, :value)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
BEGIN_ARCHIVE: Final[LiteralString] = (
    "UPDATE jobs SET archive_state = 'pending', archive_attempts = 0, archive_next_at = :now,"
    " archive_owed_event = CASE WHEN (SELECT value FROM kied_state WHERE name = 'archive')"
    " = 'notify-after' THEN :event ELSE NULL END"
    " WHERE id = :id AND result_urls <> '[]'"
    " AND (SELECT value FROM kied_state WHERE name = 'archive') IN ('on', 'notify-after')"
    " RETURNING " + JOB_COLUMNS
)
DUE_ARCHIVES: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE archive_state = 'pending'"
    " AND archive_next_at <= :now ORDER BY archive_next_at LIMIT :limit"
)
NEXT_ARCHIVE_AT: Final[LiteralString] = (
    "SELECT MIN(archive_next_at) FROM jobs WHERE archive_state = 'pending'"
)
PENDING_ARCHIVES: Final[LiteralString] = "SELECT COUNT(*) FROM jobs WHERE archive_state = 'pending'"
FINISH_ARCHIVE: Final[LiteralString] = (
    "UPDATE jobs SET archive_state = 'archived', files = :files, archive_next_at = NULL,"
    " archive_owed_event = NULL, last_error = NULL, updated_at = :now"
    " WHERE id = :id AND archive_state = 'pending' RETURNING " + JOB_COLUMNS
)
ARCHIVE_LATER: Final[LiteralString] = (
    "UPDATE jobs SET archive_attempts = archive_attempts + 1, last_error = :error,"
    " archive_next_at = :next_at, updated_at = :now"
    " WHERE id = :id AND archive_state = 'pending' RETURNING " + JOB_COLUMNS
)
ARCHIVE_GIVE_UP: Final[LiteralString] = (
    "UPDATE jobs SET archive_attempts = archive_attempts + 1, last_error = :error,"
    " archive_state = 'failed', archive_next_at = NULL, archive_owed_event = NULL,"
    " updated_at = :now WHERE id = :id AND archive_state = 'pending' RETURNING " + JOB_COLUMNS
)
RETRY_FAILED_ARCHIVES: Final[LiteralString] = (
    "UPDATE jobs SET archive_state = 'pending', archive_attempts = 0, archive_next_at = :now,"
    " updated_at = :now WHERE archive_state = 'failed' RETURNING id"
)
RETRY_ARCHIVE: Final[LiteralString] = (
    "UPDATE jobs SET archive_state = 'pending', archive_attempts = 0, archive_next_at = :now,"
    " updated_at = :now WHERE id = :id AND state = 'succeeded' AND result_urls <> '[]'"
    " AND (archive_state IS NULL OR archive_state <> 'pending') RETURNING id"
)
# Deliveries go by their own age, with the jobs' retention: a delivery is made when its
# job changes, so it goes about when its job does, and the table has no index by job.
PRUNE_DELIVERIES: Final[LiteralString] = (
    "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
    " WHERE created_at < :before AND state <> 'pending' ORDER BY created_at LIMIT :limit)"
)
PRUNE_INBOX: Final[LiteralString] = (
    "DELETE FROM callback_inbox WHERE id IN (SELECT id FROM callback_inbox"
    " WHERE received_at < :before ORDER BY received_at LIMIT :limit)"
)
#: What each prune would delete now: the count, and the oldest time.
COUNT_PRUNABLE: Final[Mapping[PruneKind, LiteralString]] = {
    PruneKind.JOBS: (
        "SELECT COUNT(*), MIN(ended_at) FROM jobs WHERE ended_at < :before"
        " AND state NOT IN ('submitting', 'pending')"
    ),
    PruneKind.DELIVERIES: (
        "SELECT COUNT(*), MIN(created_at) FROM webhook_deliveries"
        " WHERE created_at < :before AND state <> 'pending'"
    ),
    PruneKind.INBOX: (
        "SELECT COUNT(*), MIN(received_at) FROM callback_inbox WHERE received_at < :before"
    ),
    PruneKind.EVENTS: "SELECT COUNT(*), MIN(created_at) FROM events WHERE created_at < :before",
    PruneKind.SIGNATURES: (
        "SELECT COUNT(*), MIN(seen_at) FROM callback_signatures WHERE seen_at < :before"
    ),
}


def for_psycopg(sql: LiteralString) -> LiteralString:
    """``sql`` with ``:name`` parameters as psycopg's ``%(name)s``; the statements given to
    it have no other colon."""
    converted: LiteralString = re.sub(r":(\w+)", r"%(\1)s", sql)
    return converted


#: An inbox row's id and the report it carried, for a callback that came before its job.
WAITING_CALLBACK_COLUMNS: Final[LiteralString] = (
    "id, event, kie_state, result_urls, result, error_code, error_message, auth"
)

#: States in which a callback's request to confirm its task's status is kept: those a
#: KIE outcome may still change.
CONFIRMABLE_STATES: Final = frozenset({JobState.SUBMITTING, JobState.PENDING, JobState.TIMED_OUT})

# A callback authenticated by KIE's signature alone asks the leader to confirm its
# task's status with KIE; a newer request replaces an older one, and nothing else changes.
REQUEST_CONFIRM: Final[LiteralString] = (
    "UPDATE jobs SET confirm_requested_at = :now WHERE id = :id"
    " AND state IN ('submitting', 'pending', 'timed_out')"
    " AND (confirm_requested_at IS NULL OR confirm_requested_at < :now)"
)

REMEMBER_SIGNATURE: Final[LiteralString] = (
    "INSERT INTO callback_signatures (digest, seen_at) VALUES (:digest, :seen_at)"
    " ON CONFLICT (digest) DO NOTHING"
)

PRUNE_SIGNATURES: Final[LiteralString] = (
    "DELETE FROM callback_signatures WHERE digest IN (SELECT digest FROM callback_signatures"
    " WHERE seen_at < :before ORDER BY seen_at LIMIT :limit)"
)


def _dump_json(value: JsonValue) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


#: Most task ids kept in a job's ``other_task_ids``: enough to show what happened, and
#: bounded whatever a sender with the callback secret sends.
MAX_OTHER_TASKS: Final = 20


def match_callback(job: Job, task_id: TaskId | None) -> CallbackEffect | None:
    """Whether an authenticated callback naming ``task_id`` may change ``job``.

    ``None``: it may (the job's own task, or a job still waiting for its first task,
    which adopts this one). ``OTHER_TASK``: it may not: a job ends only from its own task,
    and a callback that names no task cannot show it is that.
    """
    if task_id is None or (job.task_id is not None and job.task_id != task_id):
        return CallbackEffect.OTHER_TASK
    return None


def other_tasks_value(job: Job, task_id: TaskId | None) -> str | None:
    """``job``'s ``other_task_ids`` column with ``task_id`` added; None when unchanged."""
    if (
        task_id is None
        or task_id == job.task_id
        or task_id in job.other_task_ids
        or len(job.other_task_ids) >= MAX_OTHER_TASKS
    ):
        return None
    return json.dumps([*job.other_task_ids, task_id], ensure_ascii=False)


def event_values(kind: EventType, job: Job, now: float) -> dict[str, Any]:
    """A new event about ``job`` as column values (all but the cursor)."""
    return {
        "id": new_event_id(),
        "type": kind.value,
        "created_at": now,
        "job_id": job.id,
        "job": json.dumps(job_view(job), ensure_ascii=False, separators=(",", ":")),
    }


def event_from_row(row: Iterable[Any]) -> Event:
    """The event in a row of :data:`EVENT_COLUMNS`."""
    cursor, event_id, kind, created_at, job_id, job = row
    return Event(
        cursor=cursor,
        id=event_id,
        type=kind,
        created_at=created_at,
        job_id=JobId(job_id),
        job=json.loads(job),
    )


def new_event_id() -> str:
    """A new event's stable id."""
    return "evt_" + uuid.uuid4().hex


def metadata_matches(metadata: JsonObject | None, key: str, value: str) -> bool:
    """Whether ``metadata[key]`` is ``value``: the string, or a number or boolean whose
    JSON text it is. The database stores say the same in SQL."""
    if metadata is None or key not in metadata:
        return False
    found = metadata[key]
    if isinstance(found, str):
        return found == value
    if isinstance(found, bool | int | float) and found is not None:
        return json.dumps(found) == value
    return False


def check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, not {limit}")


def apply_statements(
    *,
    succeeded: LiteralString,
    failed: LiteralString,
    ended: LiteralString,
    progress: LiteralString,
) -> dict[EventKind, LiteralString]:
    """The compare-and-set each event runs.

    An outcome writes its result or its error; another event that ends the job
    (deadline, cancel) keeps any error it carries; the rest only move the state.
    """

    def statement(event: EventKind) -> LiteralString:
        if event is EventKind.SUCCEEDED:
            return succeeded
        if event is EventKind.FAILED:
            return failed
        if target(event) in TERMINAL_STATES:
            return ended
        return progress

    return {event: statement(event) for event in EventKind}


def report_values(report: Report) -> dict[str, Any]:
    """A report as column values; raises ``TypeError`` for what JSON cannot hold."""
    event = report.event
    return {
        "event": event.value,
        "target": target(event).value,
        "kie_state": report.kie_state,
        "result_urls": json.dumps(list(report.result_urls), ensure_ascii=False),
        "result": _dump_json(report.result),
        "error_code": report.error_code,
        "error_message": report.error_message,
        "ended_by": report.source.value,
    }


#: The inbox's report columns for a callback that carried no report.
NO_REPORT: Final[Mapping[str, Any]] = dict.fromkeys(
    ("event", "kie_state", "result_urls", "result", "error_code", "error_message")
)


def new_job_values(new: NewJob) -> dict[str, Any]:
    """A new job as column values; raises ``TypeError`` for what JSON cannot hold.

    A job created with a task id starts ``pending``, else ``submitting``.
    """
    return {
        "id": new.id,
        "family": new.family,
        "model": new.model,
        "task_id": new.task_id,
        "state": (JobState.SUBMITTING if new.task_id is None else JobState.PENDING).value,
        "request": _dump_json(new.request),
        "metadata": _dump_json(new.metadata),
        "idempotency_key": new.idempotency_key,
        "created_at": new.created_at,
        "deadline_at": new.deadline_at,
    }


def job_from_row(row: Iterable[Any]) -> Job:
    """The job in a row of :data:`JOB_COLUMNS`."""
    (
        job_id,
        family,
        model,
        task_id,
        state,
        request,
        metadata,
        idempotency_key,
        created_at,
        updated_at,
        deadline_at,
        kie_state,
        result_urls,
        result,
        error_code,
        error_message,
        ended_by,
        ended_at,
        late,
        last_error,
        submit_sent_at,
        submit_count,
        submit_callback_url,
        other_task_ids,
        confirm_requested_at,
        files,
        archive_state,
        archive_attempts,
        archive_next_at,
        archive_owed_event,
    ) = row
    return Job(
        id=JobId(job_id),
        family=family,
        model=model,
        task_id=None if task_id is None else TaskId(task_id),
        state=JobState(state),
        request=_load_json(request),
        metadata=_load_json(metadata),
        idempotency_key=idempotency_key,
        created_at=created_at,
        updated_at=updated_at,
        deadline_at=deadline_at,
        kie_state=kie_state,
        result_urls=tuple(json.loads(result_urls)),
        result=_load_json(result),
        error_code=error_code,
        error_message=error_message,
        ended_by=None if ended_by is None else EndedBy(ended_by),
        ended_at=ended_at,
        late=bool(late),
        last_error=last_error,
        submit_sent_at=submit_sent_at,
        submit_count=submit_count,
        submit_callback_url=submit_callback_url,
        other_task_ids=tuple(json.loads(other_task_ids)),
        confirm_requested_at=confirm_requested_at,
        files=files_from_json(files),
        archive_state=None if archive_state is None else ArchiveState(archive_state),
        archive_attempts=archive_attempts,
        archive_next_at=archive_next_at,
        archive_owed_event=None if archive_owed_event is None else EventType(archive_owed_event),
    )


def files_to_json(files: Sequence[ArchivedFile]) -> str:
    """A job's ``files`` column."""
    return json.dumps([asdict(f) for f in files], ensure_ascii=False, separators=(",", ":"))


def files_from_json(text: str | None) -> tuple[ArchivedFile, ...]:
    """The files in a ``files`` column (NULL: none)."""
    if text is None:
        return ()
    return tuple(ArchivedFile(**record) for record in json.loads(text))


def trash_keys(text: str) -> list[str]:
    """The archive keys in an ``archive_trash.files`` column."""
    return [f.key for f in files_from_json(text)]


def entry_values(entry: InboxEntry) -> dict[str, Any]:
    """An inbox entry as column values; :func:`stored_callback_from_row` reads them back."""
    return {
        "received_at": entry.received_at,
        "body": entry.body,
        "body_size": entry.body_size,
        "content_type": entry.content_type,
        "query": entry.query,
        "remote": entry.remote,
        "task_id": entry.task_id,
        "found_by": entry.found_by,
        "job_id": entry.job_id,
        "outcome": entry.outcome,
        "problem": entry.problem,
        "authenticated": entry.authenticated,
        "auth": entry.auth,
        "headers": None if entry.headers is None else json.dumps(dict(entry.headers)),
        "body_sha256": entry.body_sha256,
        "journal_id": entry.journal_id,
    }


def stored_callback_from_row(row: Iterable[Any]) -> StoredCallback:
    """The inbox entry in a row of :data:`CALLBACK_COLUMNS`."""
    (
        inbox_id,
        received_at,
        body,
        body_size,
        content_type,
        query,
        remote,
        task_id,
        found_by,
        job_id,
        outcome,
        problem,
        authenticated,
        auth,
        effect,
        matched,
        headers,
        body_sha256,
        journal_id,
    ) = row
    entry = InboxEntry(
        received_at=received_at,
        body=bytes(body),
        body_size=body_size,
        content_type=content_type,
        query=query,
        remote=remote,
        task_id=None if task_id is None else TaskId(task_id),
        found_by=found_by,
        job_id=None if job_id is None else JobId(job_id),
        outcome=outcome,
        problem=problem,
        authenticated=bool(authenticated),
        auth=auth,
        headers=None if headers is None else json.loads(headers),
        body_sha256=body_sha256,
        journal_id=journal_id,
    )
    return StoredCallback(
        id=inbox_id,
        entry=entry,
        effect=CallbackEffect(effect),
        matched_job_id=None if matched is None else JobId(matched),
    )


def waiting_report(row: Iterable[Any]) -> tuple[int, Report, bool]:
    """The inbox id and the report in a row of :data:`WAITING_CALLBACK_COLUMNS`, and
    whether the report is only a hint to confirm (see :func:`confirms_only`)."""
    inbox_id, event, kie_state, result_urls, result, error_code, error_message, auth = row
    report = Report(
        event=EventKind(event),
        source=EndedBy.CALLBACK,
        kie_state=kie_state,
        result_urls=tuple(_load_json(result_urls) or ()),
        result=_load_json(result),
        error_code=error_code,
        error_message=error_message,
    )
    return inbox_id, report, confirms_only(auth)


def confirms_only(auth: str) -> bool:
    """Whether a callback authenticated as ``auth`` only asks for its task's status to be
    confirmed, instead of being applied: its body is not authenticated."""
    return not body_is_authenticated(auth)


def end_archive(
    before: Job | None,
    update: Callable[[], Job],
    append_event: Callable[[EventType, Job], None],
) -> Job | None:
    """Apply a change to a job whose files are being archived, and write what it owes.

    ``before`` is the job as read in the transaction; ``update`` runs the statement and
    returns the job after it; ``append_event`` appends an event in the same transaction.
    None when the job is not pending archive (the change is a no-op). Once the job leaves
    ``pending``, the event held back for it (``KIED_NOTIFY_AFTER_ARCHIVE``) is written,
    then ``job.archived`` if its files are kept.
    """
    if before is None or before.archive_state is not ArchiveState.PENDING:
        return None
    job = update()
    if job.archive_state is ArchiveState.PENDING:
        return job
    if before.archive_owed_event is not None:
        append_event(before.archive_owed_event, job)
    if job.archive_state is ArchiveState.ARCHIVED:
        append_event(EventType.ARCHIVED, job)
    return job
