"""SQLite storage: one file in WAL mode, one connection, driven through one thread at a time."""

from __future__ import annotations

import errno
import json
import sqlite3
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final, LiteralString, TypeVar

import trio

from kied.core.jobs import (
    ACTIVE_STATES,
    ArchivedFile,
    EndedBy,
    EventKind,
    EventType,
    Job,
    JobId,
    NewJob,
    Report,
    TaskId,
    event_type,
    is_late,
    sources,
)
from kied.errors import ConflictError, StoreMisconfiguredError, StoreUnavailableError
from kied.store._base import (
    ArchiveMode,
    Attached,
    CallbackEffect,
    CallbackRecord,
    Event,
    InboxEntry,
    JobStore,
    Prunable,
    PruneKind,
    StoredCallback,
)
from kied.store._common import (
    ARCHIVE_GIVE_UP,
    ARCHIVE_LATER,
    ARCHIVE_TRASH,
    BEGIN_ARCHIVE,
    BEGIN_SUBMISSION,
    CALLBACK_COLUMNS,
    CONFIRMABLE_STATES,
    COUNT_PRUNABLE,
    DUE_ARCHIVES,
    END_SUBMISSION,
    FINISH_ARCHIVE,
    FORGET_ARCHIVE_TRASH,
    INSERT_ARCHIVE_TRASH,
    INSERT_EVENT,
    JOB_COLUMNS,
    JOURNALED_CALLBACK,
    LIST_CALLBACKS_FOR_JOB,
    LIST_CALLBACKS_FOR_TASK_AND_JOB,
    LIST_EVENTS,
    NEXT_ARCHIVE_AT,
    NO_REPORT,
    PENDING_ARCHIVES,
    PRUNE_DELIVERIES,
    PRUNE_EVENTS,
    PRUNE_INBOX,
    PRUNE_JOBS,
    PRUNE_SIGNATURES,
    PUT_STATE,
    REMEMBER_SIGNATURE,
    REQUEST_CONFIRM,
    RETRY_ARCHIVE,
    RETRY_FAILED_ARCHIVES,
    SET_OTHER_TASKS,
    WAITING_CALLBACK_COLUMNS,
    apply_statements,
    check_limit,
    confirms_only,
    end_archive,
    entry_values,
    event_from_row,
    event_values,
    files_to_json,
    job_from_row,
    match_callback,
    new_job_values,
    other_tasks_value,
    report_values,
    stored_callback_from_row,
    trash_keys,
    waiting_report,
)
from kied.store._deliveries import DeliveryMethods, DeliverySql
from kied.store._listening import ListeningMethods, ListeningSql
from kied.store._migrations import SQLITE_MIGRATIONS
from kied.store._queue import CallbackQueue

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
    from pathlib import Path

__all__ = ["SqliteStore"]

_T = TypeVar("_T")
#: A callback as queued for writing: the entry, and the report it carries.
_QueuedCallback = tuple[InboxEntry, Report | None]

#: How long a write waits for another process's transaction (SQLite's busy_timeout).
_BUSY_TIMEOUT_S: Final = 5.0
#: Most callbacks written in one transaction, so that none holds the write lock for long.
_MAX_CALLBACK_BATCH: Final = 256

# ---------------------------------------------------------------------------- SQL

_PRAGMA_WAL: Final[LiteralString] = "PRAGMA journal_mode=WAL"
_PRAGMA_SYNCHRONOUS: Final[LiteralString] = "PRAGMA synchronous=NORMAL"
_PRAGMA_FOREIGN_KEYS: Final[LiteralString] = "PRAGMA foreign_keys=ON"
_BEGIN_IMMEDIATE: Final[LiteralString] = "BEGIN IMMEDIATE"
_COMMIT: Final[LiteralString] = "COMMIT"
_ROLLBACK: Final[LiteralString] = "ROLLBACK"
_SAVEPOINT: Final[LiteralString] = "SAVEPOINT callback"
_ROLLBACK_TO_SAVEPOINT: Final[LiteralString] = "ROLLBACK TO callback"
_RELEASE_SAVEPOINT: Final[LiteralString] = "RELEASE callback"

_CREATE_SCHEMA_VERSION: Final[LiteralString] = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
)"""
_SELECT_SCHEMA_VERSION: Final[LiteralString] = (
    "SELECT COALESCE(MAX(version), 0) FROM schema_version"
)
_INSERT_SCHEMA_VERSION: Final[LiteralString] = (
    "INSERT INTO schema_version (version, applied_at)"
    " VALUES (:version, (julianday('now') - 2440587.5) * 86400.0)"
)

_SELECT_JOB: Final[LiteralString] = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE id = :id"
_SELECT_JOB_BY_TASK: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE task_id = :task_id"
)
_SELECT_JOB_BY_KEY: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE idempotency_key = :idempotency_key"
)
_INSERT_JOB: Final[LiteralString] = (
    "INSERT INTO jobs (id, family, model, task_id, state, request, metadata, idempotency_key,"
    " created_at, updated_at, deadline_at)"
    " VALUES (:id, :family, :model, :task_id, :state, :request, :metadata, :idempotency_key,"
    " :created_at, :created_at, :deadline_at)"
    " RETURNING " + JOB_COLUMNS
)
_LIST_JOBS: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT :limit"
)
_LIST_JOBS_IN_STATES: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs"
    " WHERE state IN (SELECT value FROM json_each(:states))"
    " ORDER BY created_at DESC, rowid DESC LIMIT :limit"
)
_UNFINISHED_JOBS: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs"
    " WHERE state IN (SELECT value FROM json_each(:states))"
    " ORDER BY deadline_at, created_at, rowid"
)
_SET_TASK: Final[LiteralString] = (
    "UPDATE jobs SET task_id = :task_id, updated_at = :now"
    " WHERE id = :id AND task_id IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM jobs WHERE task_id = :task_id)"
)
_NOTE_ERROR: Final[LiteralString] = (
    "UPDATE jobs SET last_error = :message, updated_at = :now WHERE id = :id"
)

# The compare-and-set: the row changes only from a state the event applies to
# (``sources(event)``, bound as a JSON array). In SET, column names are the old values,
# so ``late`` is computed from the state the job had before.
_CAS: Final[LiteralString] = (
    " WHERE id = :id AND state IN (SELECT value FROM json_each(:sources)) RETURNING " + JOB_COLUMNS
)
_APPLY_PROGRESS: Final[LiteralString] = (
    "UPDATE jobs SET state = :target, updated_at = :now,"
    " kie_state = COALESCE(:kie_state, kie_state)" + _CAS
)
_APPLY_SUCCEEDED: Final[LiteralString] = (
    "UPDATE jobs SET state = :target, updated_at = :now,"
    " kie_state = COALESCE(:kie_state, kie_state),"
    " result_urls = :result_urls, result = :result, error_code = NULL, error_message = NULL,"
    " ended_by = :ended_by, ended_at = :now,"
    " late = (late OR state IN (SELECT value FROM json_each(:late_from)))" + _CAS
)
_APPLY_FAILED: Final[LiteralString] = (
    "UPDATE jobs SET state = :target, updated_at = :now,"
    " kie_state = COALESCE(:kie_state, kie_state),"
    " error_code = :error_code, error_message = :error_message,"
    " ended_by = :ended_by, ended_at = :now,"
    " late = (late OR state IN (SELECT value FROM json_each(:late_from)))" + _CAS
)
# Deadline and cancel: the job ends without an outcome from KIE; an error the report
# carries (why it was stopped) is kept, and none is invented.
_APPLY_ENDED: Final[LiteralString] = (
    "UPDATE jobs SET state = :target, updated_at = :now,"
    " kie_state = COALESCE(:kie_state, kie_state),"
    " error_code = COALESCE(:error_code, error_code),"
    " error_message = COALESCE(:error_message, error_message),"
    " ended_by = :ended_by, ended_at = :now,"
    " late = (late OR state IN (SELECT value FROM json_each(:late_from)))" + _CAS
)

_INSERT_CALLBACK: Final[LiteralString] = (
    "INSERT INTO callback_inbox (received_at, body, body_size, content_type, query, remote,"
    " task_id, found_by, job_id, outcome, problem, authenticated, auth, effect, matched_job_id,"
    " event, kie_state, result_urls, result, error_code, error_message, headers, body_sha256,"
    " journal_id)"
    " VALUES (:received_at, :body, :body_size, :content_type, :query, :remote, :task_id,"
    " :found_by, :job_id, :outcome, :problem, :authenticated, :auth, :effect, :matched_job_id,"
    " :event, :kie_state, :result_urls, :result, :error_code, :error_message, :headers,"
    " :body_sha256, :journal_id)"
)
# A callback that arrived before any job had its task id: the newest authenticated
# outcome (success or failure) no job matched.
_WAITING_CALLBACK: Final[LiteralString] = (
    "SELECT " + WAITING_CALLBACK_COLUMNS + " FROM callback_inbox"
    " WHERE task_id = :task_id AND authenticated = 1 AND effect = :no_job"
    " AND outcome IN ('success', 'fail')"
    " AND event IN (SELECT value FROM json_each(:events))"
    " ORDER BY id DESC LIMIT 1"
)
_SET_CALLBACK_EFFECT: Final[LiteralString] = (
    "UPDATE callback_inbox SET effect = :effect, matched_job_id = :job_id WHERE id = :id"
)
_LIST_CALLBACKS: Final[LiteralString] = (
    "SELECT " + CALLBACK_COLUMNS + " FROM callback_inbox ORDER BY id DESC LIMIT :limit"
)
_LIST_CALLBACKS_FOR_TASK: Final[LiteralString] = (
    "SELECT " + CALLBACK_COLUMNS + " FROM callback_inbox WHERE task_id = :task_id"
    " ORDER BY id DESC LIMIT :limit"
)
# One metadata condition; the n-th of a query binds :key_n and :value_n. A number's text
# is SQLite's own (integers read back as Python writes them). Metadata that is not valid
# JSON (Python writes NaN) matches nothing instead of failing the query.
_METADATA_MATCH: Final[LiteralString] = (
    " AND CASE WHEN json_valid(jobs.metadata) THEN EXISTS (SELECT 1 FROM"
    " json_each(jobs.metadata) AS m WHERE m.key = :key_N AND CASE m.type"
    " WHEN 'text' THEN m.value = :value_N WHEN 'true' THEN :value_N = 'true'"
    " WHEN 'false' THEN :value_N = 'false' WHEN 'integer' THEN CAST(m.value AS TEXT) = :value_N"
    " WHEN 'real' THEN json_quote(m.value) = :value_N ELSE 0 END) ELSE 0 END"
)
_LIST_JOBS_FILTERED: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE (:states IS NULL"
    " OR state IN (SELECT value FROM json_each(:states)))"
)
_PING: Final[LiteralString] = "SELECT 1"


def _json_array(values: Collection[str]) -> str:
    return json.dumps(sorted(values))


_APPLY_BY_EVENT: Final[Mapping[EventKind, LiteralString]] = apply_statements(
    succeeded=_APPLY_SUCCEEDED, failed=_APPLY_FAILED, ended=_APPLY_ENDED, progress=_APPLY_PROGRESS
)
_SOURCES_JSON: Final[Mapping[EventKind, str]] = {e: _json_array(sources(e)) for e in EventKind}
_LATE_FROM_JSON: Final[Mapping[EventKind, str]] = {
    e: _json_array([s for s in sources(e) if is_late(s, e)]) for e in EventKind
}
_ACTIVE_JSON: Final = _json_array(ACTIVE_STATES)
_OUTCOME_EVENTS_JSON: Final = _json_array([EventKind.SUCCEEDED, EventKind.FAILED])


# ---------------------------------------------------------------------------- helpers


#: What the file system answers for a data directory that will never hold the database.
_MISCONFIGURED_ERRNOS = frozenset(
    {errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EROFS, errno.EACCES, errno.EPERM}
)


@contextmanager
def _map_store_errors() -> Iterator[None]:
    """Turn the driver's (and the file system's) errors into ``StoreUnavailableError``."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"SQLite: {exc}") from exc
    except OSError as exc:
        if exc.errno in _MISCONFIGURED_ERRNOS:
            # The directory is a file, read-only, or not ours: waiting will not change that.
            raise StoreMisconfiguredError(f"SQLite file: {exc}") from exc
        raise StoreUnavailableError(f"SQLite file: {exc}") from exc


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
    # writes fails at once, busy_timeout or not, when another connection wrote in between.
    conn.execute(_BEGIN_IMMEDIATE)
    try:
        yield
        conn.execute(_COMMIT)
    finally:
        if conn.in_transaction:
            conn.execute(_ROLLBACK)


def _script_statements(script: str) -> Iterator[str]:
    # The driver runs one statement per call, and executescript() would commit the
    # migration transaction, so a script is cut where SQLite itself says a statement ends.
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _write_transaction(conn):
        conn.execute(_CREATE_SCHEMA_VERSION)
        (version,) = conn.execute(_SELECT_SCHEMA_VERSION).fetchone()
        known = len(SQLITE_MIGRATIONS)
        if version > known:
            raise StoreUnavailableError(
                f"{path}: the database has schema version {version}, newer than the"
                f" {known} this kied knows; run a newer kied or restore a backup"
            )
        for number, script in enumerate(SQLITE_MIGRATIONS[version:], start=version + 1):
            for statement in _script_statements(script):
                conn.execute(statement)
            conn.execute(_INSERT_SCHEMA_VERSION, {"version": number})


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=_BUSY_TIMEOUT_S,
        isolation_level=None,  # autocommit; transactions are explicit
        check_same_thread=False,  # trio's worker threads take turns, one at a time
    )
    try:
        conn.row_factory = sqlite3.Row
        (mode,) = conn.execute(_PRAGMA_WAL).fetchone()
        if str(mode).lower() != "wal":
            raise StoreUnavailableError(f"{path}: SQLite refused WAL mode (journal mode {mode})")
        conn.execute(_PRAGMA_SYNCHRONOUS)
        conn.execute(_PRAGMA_FOREIGN_KEYS)
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _apply(conn: sqlite3.Connection, job_id: JobId, report: Report, now: float) -> Job | None:
    event = report.event
    params = {
        **report_values(report),
        "id": job_id,
        "now": now,
        "sources": _SOURCES_JSON[event],
        "late_from": _LATE_FROM_JSON[event],
    }
    rows = conn.execute(_APPLY_BY_EVENT[event], params).fetchall()
    if not rows:
        return None
    job = job_from_row(rows[0])
    kind = event_type(event, job)
    if event is EventKind.SUCCEEDED:
        params = {"id": job_id, "now": now, "event": None if kind is None else kind.value}
        row = conn.execute(BEGIN_ARCHIVE, params).fetchone()
        job = job if row is None else job_from_row(row)
    if kind is not None and job.archive_owed_event is None:
        _append_event(conn, kind, job, now)
    return job


def _one(row: Any) -> Any:
    if row is None:  # pragma: no cover - the row was read in this transaction
        raise StoreUnavailableError("a job read in this transaction is gone")
    return row


def _end_archive(
    conn: sqlite3.Connection, job_id: JobId, sql: LiteralString, params: dict[str, Any]
) -> Job | None:
    return end_archive(
        _select_job(conn, job_id),
        lambda: job_from_row(_one(conn.execute(sql, {**params, "id": job_id}).fetchone())),
        lambda kind, job: _append_event(conn, kind, job, params["now"]),
    )


def _append_event(conn: sqlite3.Connection, kind: EventType, job: Job, now: float) -> None:
    conn.execute(INSERT_EVENT, event_values(kind, job, now))


def _select_job(conn: sqlite3.Connection, job_id: JobId) -> Job | None:
    row = conn.execute(_SELECT_JOB, {"id": job_id}).fetchone()
    return None if row is None else job_from_row(row)


def _select_job_by_task(conn: sqlite3.Connection, task_id: TaskId) -> Job | None:
    row = conn.execute(_SELECT_JOB_BY_TASK, {"task_id": task_id}).fetchone()
    return None if row is None else job_from_row(row)


def _apply_waiting_callback(
    conn: sqlite3.Connection, job_id: JobId, task_id: TaskId, now: float
) -> None:
    row = conn.execute(
        _WAITING_CALLBACK,
        {"task_id": task_id, "no_job": CallbackEffect.NO_JOB, "events": _OUTCOME_EVENTS_JSON},
    ).fetchone()
    if row is None:
        return
    inbox_id, report, confirm = waiting_report(row)
    if confirm:
        effect = _request_confirm(conn, job_id, now)
    else:
        changed = _apply(conn, job_id, report, now)
        effect = CallbackEffect.NO_OP if changed is None else CallbackEffect.CHANGED
    conn.execute(_SET_CALLBACK_EFFECT, {"id": inbox_id, "effect": effect, "job_id": job_id})


def _request_confirm(conn: sqlite3.Connection, job_id: JobId, now: float) -> CallbackEffect:
    """Ask the leader to confirm the task's status; ``CONFIRMING``, or ``NO_OP`` when
    nothing KIE says can change the job any more."""
    conn.execute(REQUEST_CONFIRM, {"id": job_id, "now": now})
    job = _select_job(conn, job_id)
    if job is None or job.state not in CONFIRMABLE_STATES:
        return CallbackEffect.NO_OP
    return CallbackEffect.CONFIRMING


def _record_callback(
    conn: sqlite3.Connection, entry: InboxEntry, report: Report | None
) -> CallbackRecord:
    if entry.journal_id is not None:
        row = conn.execute(JOURNALED_CALLBACK, {"journal_id": entry.journal_id}).fetchone()
        if row is not None:  # stored before: the same row, nothing applied again
            inbox_id, stored_effect, matched = row
            job = None if matched is None else _select_job(conn, JobId(matched))
            return CallbackRecord(inbox_id=inbox_id, effect=CallbackEffect(stored_effect), job=job)
    effect, job, adopted = _resolve_callback(conn, entry, report)
    cursor = conn.execute(
        _INSERT_CALLBACK,
        {
            **entry_values(entry),
            **(NO_REPORT if report is None else report_values(report)),
            "effect": effect.value,
            "matched_job_id": None if job is None else job.id,
        },
    )
    inbox_id = cursor.lastrowid
    assert inbox_id is not None  # an INSERT into a rowid table
    return CallbackRecord(inbox_id=inbox_id, effect=effect, job=job, adopted=adopted)


def _keep_other_task(
    conn: sqlite3.Connection, job: Job, task_id: TaskId | None, now: float
) -> None:
    value = other_tasks_value(job, task_id)
    if value is not None:
        conn.execute(SET_OTHER_TASKS, {"id": job.id, "other_task_ids": value, "now": now})


def _resolve_callback(
    conn: sqlite3.Connection, entry: InboxEntry, report: Report | None
) -> tuple[CallbackEffect, Job | None, bool]:
    if not entry.authenticated:
        return CallbackEffect.REJECTED, None, False
    # The job that follows the callback's task first: the task id is what KIE vouches
    # for. The job id in the URL finds a job still waiting for its first task.
    job = None
    if entry.task_id is not None:
        job = _select_job_by_task(conn, entry.task_id)
    if job is None and entry.job_id is not None:
        job = _select_job(conn, entry.job_id)
    if report is None:
        return CallbackEffect.NOT_APPLICABLE, job, False
    if job is None:
        return CallbackEffect.NO_JOB, None, False
    now = entry.received_at
    refused = match_callback(job, entry.task_id)
    adopted = False
    if refused is None and job.task_id is None:
        params = {"id": job.id, "task_id": entry.task_id, "now": now}
        adopted = conn.execute(_SET_TASK, params).rowcount == 1
        if not adopted:  # another job follows that task
            refused = CallbackEffect.OTHER_TASK
        else:
            submitted = _select_job(conn, job.id)
            assert submitted is not None  # read above, in this transaction
            _append_event(conn, EventType.SUBMITTED, submitted, now)
    if refused is not None:
        _keep_other_task(conn, job, entry.task_id, now)
        return refused, _select_job(conn, job.id), False
    if confirms_only(entry.auth):
        return _request_confirm(conn, job.id, now), _select_job(conn, job.id), adopted
    changed = _apply(conn, job.id, report, now)
    if changed is not None:
        return CallbackEffect.CHANGED, changed, adopted
    return CallbackEffect.NO_OP, _select_job(conn, job.id), adopted


def _record_callbacks(
    batch: list[_QueuedCallback], conn: sqlite3.Connection
) -> list[CallbackRecord | Exception]:
    results: list[CallbackRecord | Exception] = []
    with _write_transaction(conn):
        for entry, report in batch:
            conn.execute(_SAVEPOINT)
            try:
                with _map_store_errors():
                    results.append(_record_callback(conn, entry, report))
            except Exception as exc:
                conn.execute(_ROLLBACK_TO_SAVEPOINT)
                results.append(exc)
            conn.execute(_RELEASE_SAVEPOINT)
    return results


# ---------------------------------------------------------------------------- the store


class SqliteStore(CallbackQueue[_QueuedCallback], DeliveryMethods, ListeningMethods, JobStore):
    """:class:`~kied.store.JobStore` on one SQLite file.

    Every operation is one transaction run in one worker-thread call, through a
    ``CapacityLimiter(1)`` of its own, so the connection is used by one thread at a time.
    Writes use ``BEGIN IMMEDIATE`` and wait up to 5 s for another process that holds the
    database.

    Callbacks that arrive while one is being written are queued and written together,
    in arrival order, in one transaction and one thread hop: the thread hop, not SQLite,
    is what a write costs. Each keeps its own savepoint, so one callback that fails does
    not fail the others.

    Cancellation:
        An operation whose thread has started runs to its end (commit or rollback)
        before the cancellation is seen, so a transaction is never left half done. That
        bounds the wait by the operation, or by the 5 s busy timeout.

    Resource handling:
        :meth:`connect` opens the connection and :meth:`aclose` closes it; use
        :func:`kied.store.open_store`, which does both.
    """

    def __init__(self, conn: sqlite3.Connection, limiter: trio.CapacityLimiter) -> None:
        """Wrap an open, migrated connection; use :meth:`connect` instead."""
        super().__init__()
        self._conn: sqlite3.Connection | None = conn
        self._limiter = limiter

    @classmethod
    async def connect(cls, path: Path) -> SqliteStore:
        """Open (creating if needed) and migrate the database file at ``path``.

        Args:
            path: the database file; missing parent directories are created.

        Returns:
            The open store.

        Raises:
            StoreUnavailableError: the file cannot be opened or migrated, or its schema
                is newer than this version of kied knows.

        Cancellation:
            Once the open has started in its thread it runs to its end and the store is
            returned; the cancellation is seen at the caller's next checkpoint.

        Resource handling:
            The caller owns the store and must :meth:`aclose` it.
        """
        limiter = trio.CapacityLimiter(1)
        with _map_store_errors():
            conn = await trio.to_thread.run_sync(_connect, path, limiter=limiter)
        return cls(conn, limiter)

    _deliveries = DeliverySql(psycopg=False)
    _listening = ListeningSql(psycopg=False)

    async def _db_read(self, operation: Callable[[Any], _T]) -> _T:
        return await self._run(operation)

    async def _db_write(self, operation: Callable[[Any], _T]) -> _T:
        def in_transaction(conn: sqlite3.Connection) -> _T:
            with _write_transaction(conn):
                return operation(conn)

        return await self._run(in_transaction)

    async def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._conn is None:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailableError("the store is closed")
        with _map_store_errors():
            return await trio.to_thread.run_sync(self._call, operation, limiter=self._limiter)

    def _call(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        # Runs in the worker thread, after the limiter let it in: the store may have been
        # closed while this call waited for its turn.
        conn = self._conn
        if conn is None:
            raise StoreUnavailableError("the store is closed")
        return operation(conn)

    async def ping(self) -> None:
        """Run ``SELECT 1``."""
        await self._run(lambda conn: conn.execute(_PING).fetchall())

    async def create_job(self, new: NewJob) -> tuple[Job, bool]:
        """Store ``new``; see :meth:`JobStore.create_job`.

        A job with the same id, idempotency key or task id is returned as it is, with
        ``False``. A job created with a task id starts ``pending``, else ``submitting``.
        """

        def create(conn: sqlite3.Connection) -> tuple[Job, bool]:
            with _write_transaction(conn):
                existing = _select_job(conn, new.id)
                if existing is None and new.idempotency_key is not None:
                    row = conn.execute(
                        _SELECT_JOB_BY_KEY, {"idempotency_key": new.idempotency_key}
                    ).fetchone()
                    existing = None if row is None else job_from_row(row)
                if existing is None and new.task_id is not None:
                    existing = _select_job_by_task(conn, new.task_id)
                if existing is not None:
                    return existing, False
                row = conn.execute(_INSERT_JOB, new_job_values(new)).fetchall()[0]
                created = job_from_row(row)
                _append_event(conn, EventType.CREATED, created, new.created_at)
                if new.task_id is None:
                    return created, True
                _apply_waiting_callback(conn, new.id, new.task_id, new.created_at)
                job = _select_job(conn, new.id)
                assert job is not None  # inserted above, in this transaction
                return job, True

        return await self._run(create)

    async def get_job(self, job_id: JobId) -> Job | None:
        return await self._run(lambda conn: _select_job(conn, job_id))

    async def get_job_by_task(self, task_id: TaskId) -> Job | None:
        return await self._run(lambda conn: _select_job_by_task(conn, task_id))

    async def list_jobs(
        self,
        *,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[Job]:
        check_limit(limit)
        params: dict[str, object]
        if metadata:
            sql: LiteralString = _LIST_JOBS_FILTERED
            params = {"states": None if states is None else _json_array(states), "limit": limit}
            for n, (key, value) in enumerate(metadata.items()):
                suffix = str(n)
                sql += _METADATA_MATCH.replace(":key_N", ":key_" + suffix).replace(
                    ":value_N", ":value_" + suffix
                )
                params["key_" + suffix] = key
                params["value_" + suffix] = value
            sql += " ORDER BY created_at DESC, rowid DESC LIMIT :limit"
        elif states is None:
            sql, params = _LIST_JOBS, {"limit": limit}
        else:
            sql, params = _LIST_JOBS_IN_STATES, {"states": _json_array(states), "limit": limit}
        return await self._run(lambda conn: [job_from_row(r) for r in conn.execute(sql, params)])

    async def unfinished_jobs(self) -> list[Job]:
        params = {"states": _ACTIVE_JSON}
        return await self._run(
            lambda conn: [job_from_row(r) for r in conn.execute(_UNFINISHED_JOBS, params)]
        )

    async def attach_task(self, job_id: JobId, task_id: TaskId, *, now: float) -> Attached | None:
        """Record ``task_id`` and apply ``accepted``; see :meth:`JobStore.attach_task`.

        The task id is recorded whatever the job's state; only the state change is a
        compare-and-set. Repeating the call is harmless.

        Raises:
            ConflictError: another job tracks this task.
            StoreUnavailableError: the database failed.
        """

        def attach(conn: sqlite3.Connection) -> Attached | None:
            with _write_transaction(conn):
                job = _select_job(conn, job_id)
                if job is None:
                    return None
                if job.task_id is not None and job.task_id != task_id:
                    # createTask answered after the job adopted another task: kept, not applied
                    _keep_other_task(conn, job, task_id, now)
                    after = _select_job(conn, job_id)
                    assert after is not None  # read above, in this transaction
                    return Attached(job=after, ended=False)
                newly_attached = job.task_id is None
                if newly_attached:
                    other = _select_job_by_task(conn, task_id)
                    if other is not None:
                        raise ConflictError(f"task {task_id} is already tracked by job {other.id}")
                    conn.execute(_SET_TASK, {"id": job_id, "task_id": task_id, "now": now})
                _apply(conn, job_id, Report(event=EventKind.ACCEPTED, source=EndedBy.SUBMIT), now)
                if newly_attached:
                    submitted = _select_job(conn, job_id)
                    assert submitted is not None
                    _append_event(conn, EventType.SUBMITTED, submitted, now)
                    _apply_waiting_callback(conn, job_id, task_id, now)
                after = _select_job(conn, job_id)
                assert after is not None
                return Attached(job=after, ended=after.terminal and not job.terminal)

        return await self._run(attach)

    async def begin_submission(
        self, job_id: JobId, *, count: int, callback_url: str | None, now: float
    ) -> Job | None:
        params = {"id": job_id, "count": count, "callback_url": callback_url, "now": now}

        def begin(conn: sqlite3.Connection) -> Job | None:
            with _write_transaction(conn):
                rows = conn.execute(BEGIN_SUBMISSION, params).fetchall()
                return job_from_row(rows[0]) if rows else None

        return await self._run(begin)

    async def end_submission(self, job_id: JobId, *, count: int, now: float) -> None:
        def end(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                conn.execute(END_SUBMISSION, {"id": job_id, "count": count, "now": now})

        await self._run(end)

    async def apply(self, job_id: JobId, report: Report, *, now: float) -> Job | None:
        def apply(conn: sqlite3.Connection) -> Job | None:
            with _write_transaction(conn):
                return _apply(conn, job_id, report, now)

        return await self._run(apply)

    async def note_error(self, job_id: JobId, message: str, *, now: float) -> None:
        def note(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                conn.execute(_NOTE_ERROR, {"id": job_id, "message": message, "now": now})

        await self._run(note)

    async def record_callback(self, entry: InboxEntry, report: Report | None) -> CallbackRecord:
        """Store ``entry`` and apply ``report``; see :meth:`JobStore.record_callback`.

        ``now`` for the job's change is ``entry.received_at``. A rejected callback looks
        nothing up; a callback with nothing to apply still names its job.

        Cancellation:
            Cancelled while it waits its turn, the callback is not written. Once its
            batch is being written, it is written, whether or not the caller waits.
        """
        return await self._queue_callback((entry, report), max_batch=_MAX_CALLBACK_BATCH)

    async def _write_callback_batch(
        self, batch: list[_QueuedCallback]
    ) -> Sequence[CallbackRecord | Exception]:
        # trio.Cancelled comes only before the thread started: nothing was written.
        return await self._run(partial(_record_callbacks, batch))

    async def list_callbacks(
        self, *, task_id: TaskId | None = None, job_id: JobId | None = None, limit: int = 100
    ) -> list[StoredCallback]:
        check_limit(limit)
        params: dict[str, object] = {"task_id": task_id, "job_id": job_id, "limit": limit}
        if task_id is None:
            sql = _LIST_CALLBACKS if job_id is None else LIST_CALLBACKS_FOR_JOB
        else:
            sql = _LIST_CALLBACKS_FOR_TASK if job_id is None else LIST_CALLBACKS_FOR_TASK_AND_JOB
        return await self._run(
            lambda conn: [stored_callback_from_row(r) for r in conn.execute(sql, params)]
        )

    async def list_events(self, *, after: int = 0, limit: int = 100) -> list[Event]:
        check_limit(limit)
        params = {"after": after, "limit": limit}
        return await self._run(
            lambda conn: [event_from_row(r) for r in conn.execute(LIST_EVENTS, params)]
        )

    async def remember_signature(self, digest: str, *, seen_at: float) -> bool:
        params = {"digest": digest, "seen_at": seen_at}

        def remember(conn: sqlite3.Connection) -> bool:
            return conn.execute(REMEMBER_SIGNATURE, params).rowcount == 1

        return await self._db_write(remember)

    async def prune_signatures(self, *, before: float, limit: int) -> int:
        check_limit(limit)
        params = {"before": before, "limit": limit}

        def prune(conn: sqlite3.Connection) -> int:
            return conn.execute(PRUNE_SIGNATURES, params).rowcount

        return await self._db_write(prune)

    async def prune_events(self, *, before: float, limit: int) -> int:
        check_limit(limit)

        def prune(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                return conn.execute(PRUNE_EVENTS, {"before": before, "limit": limit}).rowcount

        return await self._run(prune)

    async def prune_jobs(self, *, before: float, limit: int) -> list[JobId]:
        check_limit(limit)

        def prune(conn: sqlite3.Connection) -> list[JobId]:
            with _write_transaction(conn):
                rows = conn.execute(PRUNE_JOBS, {"before": before, "limit": limit}).fetchall()
                for job_id, files in rows:
                    if files is not None and files != "[]":
                        conn.execute(INSERT_ARCHIVE_TRASH, {"job_id": job_id, "files": files})
                return [JobId(row[0]) for row in rows]

        return await self._run(prune)

    async def prune_deliveries(self, *, before: float, limit: int) -> int:
        return await self._prune(PRUNE_DELIVERIES, before=before, limit=limit)

    async def prune_inbox(self, *, before: float, limit: int) -> int:
        return await self._prune(PRUNE_INBOX, before=before, limit=limit)

    async def _prune(self, sql: LiteralString, *, before: float, limit: int) -> int:
        check_limit(limit)

        def prune(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                return conn.execute(sql, {"before": before, "limit": limit}).rowcount

        return await self._run(prune)

    async def count_prunable(self, kind: PruneKind, *, before: float) -> Prunable:
        sql = COUNT_PRUNABLE[kind]
        count, oldest = await self._run(
            lambda conn: conn.execute(sql, {"before": before}).fetchone()
        )
        return Prunable(count=count, oldest=oldest)

    async def set_archive_mode(self, mode: ArchiveMode) -> None:
        await self._db_write(
            lambda conn: conn.execute(PUT_STATE, {"name": "archive", "value": mode})
        )

    async def due_archives(self, *, now: float, limit: int) -> list[Job]:
        check_limit(limit)
        params = {"now": now, "limit": limit}
        return await self._run(
            lambda conn: [job_from_row(r) for r in conn.execute(DUE_ARCHIVES, params)]
        )

    async def next_archive_at(self) -> float | None:
        row = await self._run(lambda conn: conn.execute(NEXT_ARCHIVE_AT).fetchone())
        return None if row is None else row[0]

    async def pending_archives(self) -> int:
        row = await self._run(lambda conn: conn.execute(PENDING_ARCHIVES).fetchone())
        return int(row[0])

    async def finish_archive(
        self, job_id: JobId, files: Sequence[ArchivedFile], *, now: float
    ) -> Job | None:
        params = {"files": files_to_json(files), "now": now}
        return await self._db_write(lambda conn: _end_archive(conn, job_id, FINISH_ARCHIVE, params))

    async def fail_archive(
        self, job_id: JobId, error: str, *, next_at: float | None, now: float
    ) -> Job | None:
        sql = ARCHIVE_GIVE_UP if next_at is None else ARCHIVE_LATER
        params = {"error": error, "next_at": next_at, "now": now}
        return await self._db_write(lambda conn: _end_archive(conn, job_id, sql, params))

    async def retry_archives(self, job_ids: Collection[JobId] | None, *, now: float) -> list[JobId]:
        def retry(conn: sqlite3.Connection) -> list[JobId]:
            if job_ids is None:
                rows = conn.execute(RETRY_FAILED_ARCHIVES, {"now": now}).fetchall()
                return [JobId(r[0]) for r in rows]
            marked = []
            for job_id in job_ids:
                row = conn.execute(RETRY_ARCHIVE, {"id": job_id, "now": now}).fetchone()
                if row is not None:
                    marked.append(JobId(row[0]))
            return marked

        return await self._db_write(retry)

    async def archive_trash(self, *, limit: int) -> list[tuple[JobId, list[str]]]:
        check_limit(limit)
        rows = await self._run(
            lambda conn: conn.execute(ARCHIVE_TRASH, {"limit": limit}).fetchall()
        )
        return [(JobId(job_id), trash_keys(files)) for job_id, files in rows]

    async def forget_archive_trash(self, job_ids: Collection[JobId]) -> None:
        def forget(conn: sqlite3.Connection) -> None:
            for job_id in job_ids:
                conn.execute(FORGET_ARCHIVE_TRASH, {"job_id": job_id})

        await self._db_write(forget)

    async def aclose(self) -> None:
        """Close the connection, after any operation already running. Idempotent.

        Cancellation:
            Cancelled while an operation runs, the connection is left to be closed when
            the store is garbage-collected; the store refuses new work either way.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        with _map_store_errors():
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
