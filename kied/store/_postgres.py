"""PostgreSQL storage: psycopg 3 (sync) and a connection pool, driven through worker threads.

This module imports psycopg, the optional ``kied[postgres]`` extra: import it only when a
PostgreSQL store is configured (:func:`kied.store.open_store` does).
"""

from __future__ import annotations

import hashlib
import logging
import re
import select
import time
from collections.abc import Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, LiteralString, TypeVar

import psycopg
import psycopg.errors
import trio
from psycopg import pq
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from kied._pgconn import connection_info
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
from kied.errors import (
    ConflictError,
    StoreError,
    StoreMisconfiguredError,
    StoreUnavailableError,
)
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
    for_psycopg,
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
from kied.store._migrations import POSTGRES_MIGRATIONS
from kied.store._queue import CallbackQueue

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

    from kied.settings import PostgresStoreSettings

__all__ = ["PostgresStore"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_Connection = psycopg.Connection[tuple[Any, ...]]
_Row = tuple[Any, ...]
#: A callback as queued for writing: the entry, and its report as query parameters.
_QueuedCallback = tuple[InboxEntry, Mapping[str, Any] | None]

#: Connections the pool keeps open when idle; it grows to the pool size under load.
_MIN_CONNECTIONS: Final = 2
#: Server-side bound on one statement (lock waits included), set on every connection.
_STATEMENT_TIMEOUT_S: Final = 15
#: Connection options added to the URL unless it sets them: libpq gives up on a silent
#: peer after keepalives_idle + keepalives_interval * keepalives_count seconds when
#: waiting for an answer, and after tcp_user_timeout when its own data goes unacknowledged.
#: Pauses before the second and the third attempt of an operation whose connection was
#: lost; see :func:`_may_retry`.
_RETRY_DELAYS_S: Final = (0.05, 0.25)
#: Errors with which the server says it rolled the transaction back itself (40001, 40P01);
#: psycopg does not file them under TransactionRollback.
_ROLLED_BACK: Final = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
#: Bound on closing the pool: its worker threads and idle connections.
_CLOSE_TIMEOUT_S: Final = 1.0
#: Most callbacks written in one transaction, so that none holds its locks for long.
_MAX_CALLBACK_BATCH: Final = 256

# Transaction-level advisory locks, in the two-key form so that they cannot meet a
# single-key lock: (class, key).
_MIGRATION_LOCK: Final = (0x6B696564, 0)  # "kied"
#: Class of the per-task-id locks; the key is a 32-bit hash of the task id.
_TASK_LOCK_CLASS: Final = 0x6B696574
#: Every transaction that may append to the event log takes this lock first, so that
#: appends commit in cursor order (and, taken before any other lock, it cannot deadlock).
_EVENTS_LOCK: Final = (0x6B696565, 0)

# ---------------------------------------------------------------------------- SQL

_BEGIN: Final[LiteralString] = "BEGIN"
_COMMIT: Final[LiteralString] = "COMMIT"
_ROLLBACK: Final[LiteralString] = "ROLLBACK"
_SET_STATEMENT_TIMEOUT: Final[LiteralString] = (
    "SET statement_timeout = '" + str(_STATEMENT_TIMEOUT_S) + "s'"
)
# A migration may take longer than any other statement, and is one transaction anyway.
_NO_STATEMENT_TIMEOUT: Final[LiteralString] = "SET LOCAL statement_timeout = 0"
_ADVISORY_XACT_LOCK: Final[LiteralString] = (
    "SELECT pg_advisory_xact_lock(%(lock_class)s::int4, %(lock_key)s::int4)"
)
# One statement for any number of keys, taken one after the other in the array's order.
_ADVISORY_XACT_LOCKS: Final[LiteralString] = (
    "SELECT count(pg_advisory_xact_lock(%(lock_class)s::int4, lock_key))"
    " FROM unnest(%(lock_keys)s::int4[]) AS lock_key"
)

_SCHEMA_VERSION_EXISTS: Final[LiteralString] = "SELECT to_regclass('schema_version') IS NOT NULL"
_CREATE_SCHEMA_VERSION: Final[LiteralString] = """
CREATE TABLE schema_version (
    version    integer PRIMARY KEY,
    applied_at double precision NOT NULL
)"""
_SELECT_SCHEMA_VERSION: Final[LiteralString] = (
    "SELECT COALESCE(MAX(version), 0) FROM schema_version"
)
_INSERT_SCHEMA_VERSION: Final[LiteralString] = (
    "INSERT INTO schema_version (version, applied_at)"
    " VALUES (%(version)s, extract(epoch FROM clock_timestamp()))"
)

_SELECT_JOB: Final[LiteralString] = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE id = %(id)s"
_SELECT_JOB_FOR_UPDATE: Final[LiteralString] = _SELECT_JOB + " FOR UPDATE"
_SELECT_JOB_BY_TASK: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE task_id = %(task_id)s"
)
_SELECT_JOB_BY_TASK_FOR_UPDATE: Final[LiteralString] = _SELECT_JOB_BY_TASK + " FOR UPDATE"
# The job a create_job call repeats: same id first, then same idempotency key, then
# same task id (NULL parameters match nothing).
_SELECT_EXISTING_JOB: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs"
    " WHERE id = %(id)s OR idempotency_key = %(idempotency_key)s OR task_id = %(task_id)s"
    " ORDER BY CASE WHEN id = %(id)s THEN 0"
    " WHEN idempotency_key = %(idempotency_key)s THEN 1 ELSE 2 END"
    " LIMIT 1"
)
# Any unique index (id, idempotency key, task id) makes this a no-op that returns no row;
# a concurrent insert of the same key is waited for first.
_INSERT_JOB: Final[LiteralString] = (
    "INSERT INTO jobs (id, family, model, task_id, state, request, metadata, idempotency_key,"
    " created_at, updated_at, deadline_at)"
    " VALUES (%(id)s, %(family)s, %(model)s, %(task_id)s, %(state)s, %(request)s,"
    " %(metadata)s, %(idempotency_key)s, %(created_at)s, %(created_at)s, %(deadline_at)s)"
    " ON CONFLICT DO NOTHING"
    " RETURNING " + JOB_COLUMNS
)
_LIST_JOBS: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs ORDER BY created_at DESC, seq DESC LIMIT %(limit)s"
)
_LIST_JOBS_IN_STATES: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE state = ANY(%(states)s::text[])"
    " ORDER BY created_at DESC, seq DESC LIMIT %(limit)s"
)
_UNFINISHED_JOBS: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE state = ANY(%(states)s::text[])"
    " ORDER BY deadline_at, created_at, seq"
)
_SET_TASK: Final[LiteralString] = (
    "UPDATE jobs SET task_id = %(task_id)s, updated_at = %(now)s"
    " WHERE id = %(id)s AND task_id IS NULL"
    " AND NOT EXISTS (SELECT 1 FROM jobs WHERE task_id = %(task_id)s)"
    " RETURNING " + JOB_COLUMNS
)
_NOTE_ERROR: Final[LiteralString] = (
    "UPDATE jobs SET last_error = %(message)s, updated_at = %(now)s WHERE id = %(id)s"
)

# The compare-and-set: the row changes only from a state the event applies to
# (``sources(event)``). Under READ COMMITTED a concurrent writer of the same row waits for
# this one and then re-checks the WHERE clause against the row as committed, so exactly
# one of them matches. In SET, column names are the old values, so ``late`` is computed
# from the state the job had before.
_CAS: Final[LiteralString] = (
    " WHERE id = %(id)s AND state = ANY(%(sources)s::text[]) RETURNING " + JOB_COLUMNS
)
_APPLY_PROGRESS: Final[LiteralString] = (
    "UPDATE jobs SET state = %(target)s, updated_at = %(now)s,"
    " kie_state = COALESCE(%(kie_state)s, kie_state)" + _CAS
)
_APPLY_SUCCEEDED: Final[LiteralString] = (
    "UPDATE jobs SET state = %(target)s, updated_at = %(now)s,"
    " kie_state = COALESCE(%(kie_state)s, kie_state),"
    " result_urls = %(result_urls)s, result = %(result)s, error_code = NULL,"
    " error_message = NULL, ended_by = %(ended_by)s, ended_at = %(now)s,"
    " late = (late OR state = ANY(%(late_from)s::text[]))" + _CAS
)
_APPLY_FAILED: Final[LiteralString] = (
    "UPDATE jobs SET state = %(target)s, updated_at = %(now)s,"
    " kie_state = COALESCE(%(kie_state)s, kie_state),"
    " error_code = %(error_code)s, error_message = %(error_message)s,"
    " ended_by = %(ended_by)s, ended_at = %(now)s,"
    " late = (late OR state = ANY(%(late_from)s::text[]))" + _CAS
)
# Deadline and cancel: the job ends without an outcome from KIE; an error the report
# carries (why it was stopped) is kept, and none is invented.
_APPLY_ENDED: Final[LiteralString] = (
    "UPDATE jobs SET state = %(target)s, updated_at = %(now)s,"
    " kie_state = COALESCE(%(kie_state)s, kie_state),"
    " error_code = COALESCE(%(error_code)s, error_code),"
    " error_message = COALESCE(%(error_message)s, error_message),"
    " ended_by = %(ended_by)s, ended_at = %(now)s,"
    " late = (late OR state = ANY(%(late_from)s::text[]))" + _CAS
)

_JOURNALED_CALLBACK: Final[LiteralString] = for_psycopg(JOURNALED_CALLBACK)
_INSERT_CALLBACK: Final[LiteralString] = (
    "INSERT INTO callback_inbox (received_at, body, body_size, content_type, query, remote,"
    " task_id, found_by, job_id, outcome, problem, authenticated, auth, effect, matched_job_id,"
    " event, kie_state, result_urls, result, error_code, error_message, headers, body_sha256,"
    " journal_id)"
    " VALUES (%(received_at)s, %(body)s, %(body_size)s, %(content_type)s, %(query)s,"
    " %(remote)s, %(task_id)s, %(found_by)s, %(job_id)s, %(outcome)s, %(problem)s,"
    " %(authenticated)s, %(auth)s, %(effect)s, %(matched_job_id)s, %(event)s, %(kie_state)s,"
    " %(result_urls)s, %(result)s, %(error_code)s, %(error_message)s, %(headers)s,"
    " %(body_sha256)s, %(journal_id)s)"
    " RETURNING id"
)
# A callback that arrived before any job had its task id: the newest authenticated
# outcome (success or failure) no job matched.
_WAITING_CALLBACK: Final[LiteralString] = (
    "SELECT " + WAITING_CALLBACK_COLUMNS + " FROM callback_inbox"
    " WHERE task_id = %(task_id)s AND authenticated AND effect = %(no_job)s"
    " AND outcome IN ('success', 'fail') AND event = ANY(%(events)s::text[])"
    " ORDER BY id DESC LIMIT 1"
)
_SET_CALLBACK_EFFECT: Final[LiteralString] = (
    "UPDATE callback_inbox SET effect = %(effect)s, matched_job_id = %(job_id)s WHERE id = %(id)s"
)
_LIST_CALLBACKS: Final[LiteralString] = (
    "SELECT " + CALLBACK_COLUMNS + " FROM callback_inbox ORDER BY id DESC LIMIT %(limit)s"
)
_LIST_CALLBACKS_FOR_TASK: Final[LiteralString] = (
    "SELECT " + CALLBACK_COLUMNS + " FROM callback_inbox WHERE task_id = %(task_id)s"
    " ORDER BY id DESC LIMIT %(limit)s"
)
_LIST_JOBS_FILTERED: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM jobs"
    " WHERE (%(states)s::text[] IS NULL OR state = ANY(%(states)s::text[]))"
)
# One metadata condition; the n-th of a query binds key_n and value_n.
_METADATA_MATCH: Final[LiteralString] = (
    " AND kied_metadata_matches(metadata, %(key_N)s, %(value_N)s)"
)
_SET_OTHER_TASKS: Final[LiteralString] = for_psycopg(SET_OTHER_TASKS)
_BEGIN_SUBMISSION: Final[LiteralString] = for_psycopg(BEGIN_SUBMISSION)
_END_SUBMISSION: Final[LiteralString] = for_psycopg(END_SUBMISSION)
_LIST_CALLBACKS_FOR_JOB: Final[LiteralString] = for_psycopg(LIST_CALLBACKS_FOR_JOB)
_LIST_CALLBACKS_FOR_TASK_AND_JOB: Final[LiteralString] = for_psycopg(
    LIST_CALLBACKS_FOR_TASK_AND_JOB
)
_INSERT_EVENT: Final[LiteralString] = for_psycopg(INSERT_EVENT)
_LIST_EVENTS: Final[LiteralString] = for_psycopg(LIST_EVENTS)
_PRUNE_EVENTS: Final[LiteralString] = for_psycopg(PRUNE_EVENTS)
_PRUNE_JOBS: Final[LiteralString] = for_psycopg(PRUNE_JOBS)
_INSERT_ARCHIVE_TRASH: Final[LiteralString] = for_psycopg(INSERT_ARCHIVE_TRASH)
_ARCHIVE_TRASH: Final[LiteralString] = for_psycopg(ARCHIVE_TRASH)
_FORGET_ARCHIVE_TRASH: Final[LiteralString] = for_psycopg(FORGET_ARCHIVE_TRASH)
_PUT_STATE: Final[LiteralString] = for_psycopg(PUT_STATE)
_BEGIN_ARCHIVE: Final[LiteralString] = for_psycopg(BEGIN_ARCHIVE)
_DUE_ARCHIVES: Final[LiteralString] = for_psycopg(DUE_ARCHIVES)
_NEXT_ARCHIVE_AT: Final[LiteralString] = for_psycopg(NEXT_ARCHIVE_AT)
_PENDING_ARCHIVES: Final[LiteralString] = for_psycopg(PENDING_ARCHIVES)
_FINISH_ARCHIVE: Final[LiteralString] = for_psycopg(FINISH_ARCHIVE)
_ARCHIVE_LATER: Final[LiteralString] = for_psycopg(ARCHIVE_LATER)
_ARCHIVE_GIVE_UP: Final[LiteralString] = for_psycopg(ARCHIVE_GIVE_UP)
_RETRY_FAILED_ARCHIVES: Final[LiteralString] = for_psycopg(RETRY_FAILED_ARCHIVES)
_RETRY_ARCHIVE: Final[LiteralString] = for_psycopg(RETRY_ARCHIVE)
_PRUNE_DELIVERIES: Final[LiteralString] = for_psycopg(PRUNE_DELIVERIES)
_PRUNE_INBOX: Final[LiteralString] = for_psycopg(PRUNE_INBOX)
_COUNT_PRUNABLE: Final[Mapping[PruneKind, LiteralString]] = {
    kind: for_psycopg(sql) for kind, sql in COUNT_PRUNABLE.items()
}
_REQUEST_CONFIRM: Final[LiteralString] = for_psycopg(REQUEST_CONFIRM)
_REMEMBER_SIGNATURE: Final[LiteralString] = for_psycopg(REMEMBER_SIGNATURE)
_PRUNE_SIGNATURES: Final[LiteralString] = for_psycopg(PRUNE_SIGNATURES)
_PING: Final[LiteralString] = "SELECT 1"


def _text_array(values: Collection[str]) -> list[str]:
    return sorted(str(v) for v in values)


_APPLY_BY_EVENT: Final[Mapping[EventKind, LiteralString]] = apply_statements(
    succeeded=_APPLY_SUCCEEDED, failed=_APPLY_FAILED, ended=_APPLY_ENDED, progress=_APPLY_PROGRESS
)
_SOURCES: Final[Mapping[EventKind, list[str]]] = {e: _text_array(sources(e)) for e in EventKind}
_LATE_FROM: Final[Mapping[EventKind, list[str]]] = {
    e: _text_array([s for s in sources(e) if is_late(s, e)]) for e in EventKind
}
_ACTIVE: Final = _text_array(ACTIVE_STATES)
_OUTCOME_EVENTS: Final = _text_array([EventKind.SUCCEEDED, EventKind.FAILED])


# ---------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    # libpq's messages run over several lines ("... Is the server running on that host?").
    return " ".join(str(exc).split())


#: SQLSTATEs of a server that will refuse kied until its setting changes: invalid catalog
#: name (3D000), invalid authorization (28000: unknown role, no pg_hba.conf entry) and
#: invalid password (28P01).
_MISCONFIGURED_STATES: Final = frozenset({"3D000", "28000", "28P01"})
#: libpq reports a refused connection without its SQLSTATE; these are its (English) words.
_MISCONFIGURED_WORDS: Final = re.compile(
    r'FATAL: +(database ".*" does not exist|role ".*" does not exist'
    r"|password authentication failed|no pg_hba\.conf entry)"
    r'|invalid (integer value ".*" for connection option|port number)'
)


def _misconfigured(exc: psycopg.Error) -> bool:
    """Whether the server refused the connection for good (see ``_MISCONFIGURED_STATES``)."""
    if exc.sqlstate in _MISCONFIGURED_STATES:
        return True
    return isinstance(exc, psycopg.OperationalError) and bool(
        _MISCONFIGURED_WORDS.search(_one_line(exc))
    )


def _store_error(exc: psycopg.Error) -> StoreError:
    """kied's error for a driver error; the caller raises it ``from exc``."""
    if _misconfigured(exc):
        return StoreMisconfiguredError(f"PostgreSQL: {_one_line(exc)}")
    if isinstance(exc, psycopg.errors.UniqueViolation):
        # Another writer stored the same key first (the task id of a job, mostly).
        return ConflictError(f"PostgreSQL: {_one_line(exc)}")
    if isinstance(exc, PoolClosed):
        return StoreUnavailableError("the store is closed")
    if isinstance(exc, PoolTimeout):
        return StoreUnavailableError(f"PostgreSQL: no connection: {_one_line(exc)}")
    return StoreUnavailableError(f"PostgreSQL: {_one_line(exc)}")


@contextmanager
def _map_store_errors() -> Iterator[None]:
    """Turn the driver's errors into ``ConflictError`` or ``StoreUnavailableError``."""
    try:
        yield
    except psycopg.Error as exc:
        raise _store_error(exc) from exc


@dataclass(slots=True)
class _Attempt:
    """How far one attempt at an operation got, to tell whether it may be made again."""

    write: bool
    #: COMMIT was sent at least once: from then on, something may have been written
    commit_sent: bool = False
    connection_lost: bool = False


@contextmanager
def _transaction(conn: _Connection, attempt: _Attempt) -> Iterator[None]:
    """One READ COMMITTED transaction: committed if the block ends, else rolled back."""
    conn.execute(_BEGIN)
    try:
        yield
    except BaseException:
        with suppress(psycopg.Error):  # a lost connection has rolled back already
            conn.execute(_ROLLBACK)
        raise
    attempt.commit_sent = True
    conn.execute(_COMMIT)


def _may_retry(exc: psycopg.Error, attempt: _Attempt) -> bool:
    """Whether an operation that failed with ``exc`` may safely run again from the start.

    - The server rolled the transaction back itself (deadlock, serialization failure):
      nothing was written.
    - The connection was lost (server restart, ``pg_terminate_backend``, network) and the
      operation only reads, or it writes but had not sent COMMIT: the server rolls an
      unfinished transaction back when its connection goes, so nothing was written.
    - Not when the connection was lost while COMMIT was in flight: the write may have
      been committed, and running it again could report a different result.
    - Not when the server answered with an error on a live connection (a statement
      timeout, a constraint): the same operation would meet the same answer.
    - Not when no connection came within the bound: the pool already waited that long.
    """
    if isinstance(exc, _ROLLED_BACK):
        return True
    if not attempt.connection_lost:
        return False
    return not (attempt.write and attempt.commit_sent)


def _idle_and_alive(conn: _Connection) -> bool:
    # An idle connection has nothing to read. Anything waiting is the server's goodbye (an
    # error and end of file after a restart, pg_terminate_backend or an idle timeout), so
    # this finds such a connection without a round trip.
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK:
        return False
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    return not poller.poll(0)


def _getconn(pool: ConnectionPool[_Connection], timeout_s: float) -> _Connection:
    deadline = time.monotonic() + timeout_s
    while True:
        conn = pool.getconn(timeout=max(deadline - time.monotonic(), 1e-3))
        if _idle_and_alive(conn):
            return conn
        conn.close()
        pool.putconn(conn)  # the pool replaces a closed connection


def _configure(conn: _Connection) -> None:
    conn.execute(_SET_STATEMENT_TIMEOUT)


def _conninfo(settings: PostgresStoreSettings) -> str:
    return connection_info(
        settings.url, application_name="kied", connect_timeout_s=settings.connect_timeout_s
    )


def _task_lock_key(task_id: str) -> int:
    digest = hashlib.blake2b(task_id.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_tasks(conn: _Connection, task_ids: Iterable[TaskId | None]) -> None:
    # Everything that matches callbacks and jobs by task id takes this lock first, so a
    # callback and the job it names can never miss each other: whichever commits second
    # sees the other (READ COMMITTED: each statement sees what committed before it).
    # Keys are taken in one order everywhere, so that two batches cannot deadlock on them.
    keys = sorted({_task_lock_key(t) for t in task_ids if t is not None})
    if keys:
        conn.execute(_ADVISORY_XACT_LOCKS, {"lock_class": _TASK_LOCK_CLASS, "lock_keys": keys})


def _report_params(report: Report) -> dict[str, Any]:
    """A report as query parameters; raises ``TypeError`` for what JSON cannot hold."""
    event = report.event
    return {**report_values(report), "sources": _SOURCES[event], "late_from": _LATE_FROM[event]}


_ACCEPTED: Final = _report_params(Report(event=EventKind.ACCEPTED, source=EndedBy.SUBMIT))


# ---------------------------------------------------------------------------- operations
# Each runs in a worker thread, on one connection, inside the transaction the store opened.


def _migrate(conn: _Connection) -> None:
    with _transaction(conn, _Attempt(write=True)):
        conn.execute(_NO_STATEMENT_TIMEOUT)
        # Instances starting together wait here; the first migrates, the others find
        # the work done.
        lock_class, lock_key = _MIGRATION_LOCK
        conn.execute(_ADVISORY_XACT_LOCK, {"lock_class": lock_class, "lock_key": lock_key})
        (exists,) = _one(conn.execute(_SCHEMA_VERSION_EXISTS).fetchone())
        if not exists:
            conn.execute(_CREATE_SCHEMA_VERSION)
        (version,) = _one(conn.execute(_SELECT_SCHEMA_VERSION).fetchone())
        known = len(POSTGRES_MIGRATIONS)
        if version > known:
            raise StoreUnavailableError(
                f"PostgreSQL database {conn.info.dbname!r} has schema version {version},"
                f" newer than the {known} this kied knows; run a newer kied"
            )
        for number, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
            conn.execute(script)
            conn.execute(_INSERT_SCHEMA_VERSION, {"version": number})
            logger.info(
                "[GEN] storage: PostgreSQL schema migrated to version %d",
                number,
                extra={"action": "store_migrated", "version": number},
            )


def _one(row: _Row | None) -> _Row:
    assert row is not None  # an aggregate, a function call or INSERT ... RETURNING: one row
    return row


def _open_pool(conninfo: str, settings: PostgresStoreSettings) -> ConnectionPool[_Connection]:
    # A connection of its own first: it migrates, and when the server cannot be reached
    # it says why at once (the pool would only say that it timed out).
    conn: _Connection = psycopg.connect(conninfo, autocommit=True)
    try:
        _configure(conn)
        _migrate(conn)
    finally:
        conn.close()
    pool: ConnectionPool[_Connection] = ConnectionPool(
        conninfo,
        min_size=min(_MIN_CONNECTIONS, settings.pool_size),
        max_size=settings.pool_size,
        kwargs={"autocommit": True},
        configure=_configure,
        timeout=settings.connect_timeout_s,
        name="kied",
        open=False,
    )
    try:
        pool.open(wait=True, timeout=settings.connect_timeout_s)
    except BaseException:
        pool.close(timeout=_CLOSE_TIMEOUT_S)
        raise
    return pool


def _select_job(conn: _Connection, job_id: JobId) -> Job | None:
    row = conn.execute(_SELECT_JOB, {"id": job_id}).fetchone()
    return None if row is None else job_from_row(row)


def _select_job_by_task(conn: _Connection, task_id: TaskId) -> Job | None:
    row = conn.execute(_SELECT_JOB_BY_TASK, {"task_id": task_id}).fetchone()
    return None if row is None else job_from_row(row)


def _apply(conn: _Connection, job_id: JobId, report: Mapping[str, Any], now: float) -> Job | None:
    event = EventKind(report["event"])
    row = conn.execute(_APPLY_BY_EVENT[event], {**report, "id": job_id, "now": now}).fetchone()
    if row is None:
        return None
    job = job_from_row(row)
    kind = event_type(event, job)
    if event is EventKind.SUCCEEDED:
        params = {"id": job_id, "now": now, "event": None if kind is None else kind.value}
        begun = conn.execute(_BEGIN_ARCHIVE, params).fetchone()
        job = job if begun is None else job_from_row(begun)
    if kind is not None and job.archive_owed_event is None:
        _append_event(conn, kind, job, now)
    return job


def _end_archive(
    conn: _Connection, job_id: JobId, sql: LiteralString, params: Mapping[str, Any]
) -> Job | None:
    _lock_events(conn)
    row = conn.execute(_SELECT_JOB_FOR_UPDATE, {"id": job_id}).fetchone()
    return end_archive(
        None if row is None else job_from_row(row),
        lambda: job_from_row(_one(conn.execute(sql, {**params, "id": job_id}).fetchone())),
        lambda kind, job: _append_event(conn, kind, job, params["now"]),
    )


def _prune_jobs(conn: _Connection, params: Mapping[str, Any]) -> list[JobId]:
    rows = conn.execute(_PRUNE_JOBS, params).fetchall()
    for job_id, files in rows:
        if files is not None and files != "[]":
            conn.execute(_INSERT_ARCHIVE_TRASH, {"job_id": job_id, "files": files})
    return [JobId(row[0]) for row in rows]


def _retry_archives(
    conn: _Connection, job_ids: Collection[JobId] | None, now: float
) -> list[JobId]:
    if job_ids is None:
        rows = conn.execute(_RETRY_FAILED_ARCHIVES, {"now": now}).fetchall()
        return [JobId(r[0]) for r in rows]
    marked = []
    for job_id in job_ids:
        row = conn.execute(_RETRY_ARCHIVE, {"id": job_id, "now": now}).fetchone()
        if row is not None:
            marked.append(JobId(row[0]))
    return marked


def _forget_archive_trash(conn: _Connection, job_ids: Collection[JobId]) -> None:
    for job_id in job_ids:
        conn.execute(_FORGET_ARCHIVE_TRASH, {"job_id": job_id})


def _lock_events(conn: _Connection) -> None:
    lock_class, lock_key = _EVENTS_LOCK
    conn.execute(_ADVISORY_XACT_LOCK, {"lock_class": lock_class, "lock_key": lock_key})


def _append_event(conn: _Connection, kind: EventType, job: Job, now: float) -> None:
    # The caller's transaction holds the events lock (_lock_events).
    conn.execute(_INSERT_EVENT, event_values(kind, job, now))


def _apply_alone(
    conn: _Connection, job_id: JobId, report: Mapping[str, Any], now: float
) -> Job | None:
    _lock_events(conn)
    return _apply(conn, job_id, report, now)


def _apply_waiting_callback(
    conn: _Connection, job_id: JobId, task_id: TaskId, now: float
) -> Job | None:
    """Apply the newest early outcome for ``task_id``; the job if that changed it."""
    row = conn.execute(
        _WAITING_CALLBACK,
        {"task_id": task_id, "no_job": CallbackEffect.NO_JOB.value, "events": _OUTCOME_EVENTS},
    ).fetchone()
    if row is None:
        return None
    inbox_id, report, confirm = waiting_report(row)
    if confirm:
        effect, changed = _request_confirm(conn, job_id, now)
    else:
        changed = _apply(conn, job_id, _report_params(report), now)
        effect = CallbackEffect.NO_OP if changed is None else CallbackEffect.CHANGED
    conn.execute(_SET_CALLBACK_EFFECT, {"id": inbox_id, "effect": effect.value, "job_id": job_id})
    return changed


def _request_confirm(
    conn: _Connection, job_id: JobId, now: float
) -> tuple[CallbackEffect, Job | None]:
    """Ask the leader to confirm the task's status: ``CONFIRMING`` and the job, or
    ``NO_OP`` when nothing KIE says can change the job any more."""
    conn.execute(_REQUEST_CONFIRM, {"id": job_id, "now": now})
    job = _select_job(conn, job_id)
    if job is None or job.state not in CONFIRMABLE_STATES:
        return CallbackEffect.NO_OP, job
    return CallbackEffect.CONFIRMING, job


def _create_job(conn: _Connection, params: Mapping[str, Any]) -> tuple[Job, bool]:
    task_id: TaskId | None = params["task_id"]
    _lock_events(conn)
    _lock_tasks(conn, [task_id])
    row = conn.execute(_INSERT_JOB, params).fetchone()
    if row is None:
        existing = conn.execute(_SELECT_EXISTING_JOB, params).fetchone()
        if existing is None:  # pragma: no cover - jobs are never deleted
            raise ConflictError(f"job {params['id']} conflicts with a job that is gone")
        return job_from_row(existing), False
    job = job_from_row(row)
    _append_event(conn, EventType.CREATED, job, params["created_at"])
    if task_id is not None:
        job = _apply_waiting_callback(conn, job.id, task_id, params["created_at"]) or job
    return job, True


def _attach_task(conn: _Connection, job_id: JobId, task_id: TaskId, now: float) -> Attached | None:
    _lock_events(conn)
    _lock_tasks(conn, [task_id])
    row = conn.execute(_SELECT_JOB_FOR_UPDATE, {"id": job_id}).fetchone()
    if row is None:
        return None
    job = job_from_row(row)
    if job.task_id is not None and job.task_id != task_id:
        # createTask answered after the job adopted another task: kept, not applied
        _keep_other_task(conn, job, task_id, now)
        return Attached(
            job=job_from_row(_one(conn.execute(_SELECT_JOB, {"id": job_id}).fetchone())),
            ended=False,
        )
    newly_attached = job.task_id is None
    if newly_attached:
        other = _select_job_by_task(conn, task_id)
        if other is not None:
            raise ConflictError(f"task {task_id} is already tracked by job {other.id}")
        conn.execute(_SET_TASK, {"id": job_id, "task_id": task_id, "now": now})
    _apply(conn, job_id, _ACCEPTED, now)
    if newly_attached:
        submitted = job_from_row(_one(conn.execute(_SELECT_JOB, {"id": job_id}).fetchone()))
        _append_event(conn, EventType.SUBMITTED, submitted, now)
        _apply_waiting_callback(conn, job_id, task_id, now)
    after = job_from_row(_one(conn.execute(_SELECT_JOB, {"id": job_id}).fetchone()))
    return Attached(job=after, ended=after.terminal and not job.terminal)


def _keep_other_task(conn: _Connection, job: Job, task_id: TaskId | None, now: float) -> None:
    value = other_tasks_value(job, task_id)
    if value is not None:
        conn.execute(_SET_OTHER_TASKS, {"id": job.id, "other_task_ids": value, "now": now})


def _resolve_callback(
    conn: _Connection, entry: InboxEntry, report: Mapping[str, Any] | None
) -> tuple[CallbackEffect, Job | None, bool]:
    # The caller holds the lock on entry.task_id.
    if not entry.authenticated:
        return CallbackEffect.REJECTED, None, False
    # A callback that may change its job locks the row as it reads it: until commit, the
    # job is what this transaction makes of it.
    locking = report is not None
    # The job that follows the callback's task first: the task id is what KIE vouches
    # for. The job id in the URL finds a job still waiting for its first task.
    job = None
    if entry.task_id is not None:
        sql = _SELECT_JOB_BY_TASK_FOR_UPDATE if locking else _SELECT_JOB_BY_TASK
        row = conn.execute(sql, {"task_id": entry.task_id}).fetchone()
        job = None if row is None else job_from_row(row)
    if job is None and entry.job_id is not None:
        sql = _SELECT_JOB_FOR_UPDATE if locking else _SELECT_JOB
        row = conn.execute(sql, {"id": entry.job_id}).fetchone()
        job = None if row is None else job_from_row(row)
    if report is None:
        return CallbackEffect.NOT_APPLICABLE, job, False
    if job is None:
        return CallbackEffect.NO_JOB, None, False
    now = entry.received_at
    refused = match_callback(job, entry.task_id)
    adopted = False
    if refused is None and job.task_id is None:
        params = {"id": job.id, "task_id": entry.task_id, "now": now}
        row = conn.execute(_SET_TASK, params).fetchone()
        adopted = row is not None
        if row is None:  # another job follows that task
            refused = CallbackEffect.OTHER_TASK
        else:
            job = job_from_row(row)
            _append_event(conn, EventType.SUBMITTED, job, now)
    if refused is not None:
        _keep_other_task(conn, job, entry.task_id, now)
        return refused, _select_job(conn, job.id), False
    if confirms_only(entry.auth):
        effect, confirming = _request_confirm(conn, job.id, now)
        return effect, confirming, adopted
    changed = _apply(conn, job.id, report, now)
    if changed is not None:
        return CallbackEffect.CHANGED, changed, adopted
    return CallbackEffect.NO_OP, job, adopted


def _record_callback(
    conn: _Connection, entry: InboxEntry, report: Mapping[str, Any] | None
) -> CallbackRecord:
    if entry.journal_id is not None:
        params = {"journal_id": entry.journal_id}
        row = conn.execute(_JOURNALED_CALLBACK, params).fetchone()
        if row is not None:  # stored before: the same row, nothing applied again
            inbox_id, stored_effect, matched = row
            job = None if matched is None else _select_job(conn, JobId(matched))
            return CallbackRecord(inbox_id=inbox_id, effect=CallbackEffect(stored_effect), job=job)
    effect, job, adopted = _resolve_callback(conn, entry, report)
    row = conn.execute(
        _INSERT_CALLBACK,
        {
            **entry_values(entry),
            **(NO_REPORT if report is None else report),
            "effect": effect.value,
            "matched_job_id": None if job is None else job.id,
        },
    ).fetchone()
    (inbox_id,) = _one(row)
    return CallbackRecord(inbox_id=inbox_id, effect=effect, job=job, adopted=adopted)


def _callback_tasks(batch: Iterable[tuple[InboxEntry, object]]) -> list[TaskId | None]:
    return [entry.task_id for entry, _ in batch if entry.authenticated]


def _record_callbacks(
    batch: Sequence[_QueuedCallback],
    conn: _Connection,
    attempt: _Attempt,
) -> list[CallbackRecord | Exception]:
    """Write ``batch`` in one transaction; one result (or error) per callback, in order."""
    try:
        with _transaction(conn, attempt):
            _lock_events(conn)
            _lock_tasks(conn, _callback_tasks(batch))
            return [_record_callback(conn, entry, report) for entry, report in batch]
    except Exception as exc:
        if len(batch) == 1 or conn.broken or isinstance(exc, _ROLLED_BACK):
            raise
    # One callback failed the whole batch (the server refused one of its values): write
    # each on its own, so that only that one fails.
    results: list[CallbackRecord | Exception] = []
    for entry, report in batch:
        try:
            with _transaction(conn, attempt):
                _lock_events(conn)
                _lock_tasks(conn, _callback_tasks([(entry, report)]))
                results.append(_record_callback(conn, entry, report))
        except psycopg.Error as exc:
            if conn.broken:
                raise
            error = _store_error(exc)
            error.__cause__ = exc
            results.append(error)
        except Exception as exc:
            results.append(exc)
    return results


def _fetch_all(sql: LiteralString, params: Mapping[str, Any], conn: _Connection) -> list[_Row]:
    return conn.execute(sql, params).fetchall()


def _execute(sql: LiteralString, params: Mapping[str, Any], conn: _Connection) -> None:
    conn.execute(sql, params)


# ---------------------------------------------------------------------------- the store


class PostgresStore(CallbackQueue[_QueuedCallback], DeliveryMethods, ListeningMethods, JobStore):
    """:class:`~kied.store.JobStore` on a PostgreSQL database, shared by every instance.

    Each operation is one function run in one worker thread on one pooled connection:
    reads are single statements, writes one explicit READ COMMITTED transaction. State
    changes are compare-and-set updates; callbacks and jobs that meet by task id take a
    transaction-level advisory lock on that task id first, so that across instances a
    callback that arrives while its job is being created is never missed. Worker threads
    go through a ``CapacityLimiter`` as large as the pool, so no thread waits for a
    connection another thread of the same store holds.

    Callbacks that arrive while one is being written are queued and written together,
    in arrival order, in one transaction and one thread hop: the thread hop, not the
    database, is what a write costs. When the server refuses one callback of a batch,
    the others are written one by one, so that only that one fails.

    An operation whose connection is lost is run again, at most twice, when that is safe:
    reads always; writes when COMMIT had not been sent, or when the server itself rolled
    the transaction back (deadlock, serialization failure). A write whose connection is
    lost during COMMIT may have committed, and fails with ``StoreUnavailableError``.

    Cancellation:
        A read is abandoned at once; its thread finishes on its own (every statement is
        bounded by the server's statement timeout) and returns the connection. A write
        whose thread has started runs to its end (commit or rollback) before the
        cancellation is seen, so a cancellation never leaves a write half known. That
        wait is bounded by the 15 s statement timeout per statement, the connect timeout
        for a connection, and TCP keepalives for a silent network.

    Resource handling:
        :meth:`connect` opens the pool and :meth:`aclose` closes it; use
        :func:`kied.store.open_store`, which does both.
    """

    def __init__(
        self,
        pool: ConnectionPool[_Connection],
        limiter: trio.CapacityLimiter,
        *,
        getconn_timeout_s: float,
    ) -> None:
        """Wrap an open pool on a migrated database; use :meth:`connect` instead."""
        super().__init__()
        self._pool: ConnectionPool[_Connection] | None = pool
        self._limiter = limiter
        self._getconn_timeout_s = getconn_timeout_s

    @classmethod
    async def connect(cls, settings: PostgresStoreSettings) -> PostgresStore:
        """Connect to the database ``settings.url`` names, migrate it and open the pool.

        Args:
            settings: the URL (libpq URL or key=value string), the pool size and the
                connect timeout. TCP keepalives, ``connect_timeout`` and
                ``application_name`` are added to the URL unless it sets them.

        Returns:
            The open store.

        Raises:
            ConfigError: the URL cannot be parsed.
            StoreUnavailableError: the server cannot be reached or refused the
                connection, the migration failed, or the schema is newer than this
                version of kied knows.

        Cancellation:
            Once the open has started in its thread it runs to its end (bounded by the
            connect timeout, plus the migration); the cancellation is seen afterwards and
            the store is closed again.

        Resource handling:
            The caller owns the store and must :meth:`aclose` it.
        """
        conninfo = _conninfo(settings)
        limiter = trio.CapacityLimiter(settings.pool_size)
        with _map_store_errors():
            pool = await trio.to_thread.run_sync(
                partial(_open_pool, conninfo, settings), limiter=limiter
            )
        store = cls(pool, limiter, getconn_timeout_s=settings.connect_timeout_s)
        try:
            await trio.lowlevel.checkpoint()
        except BaseException:
            with trio.move_on_after(_CLOSE_TIMEOUT_S * 2, shield=True):
                await store.aclose()
            raise
        return store

    _deliveries = DeliverySql(psycopg=True)
    _listening = ListeningSql(psycopg=True)

    async def _db_read(self, operation: Callable[[Any], _T]) -> _T:
        return await self._read(operation)

    async def _db_write(self, operation: Callable[[Any], _T]) -> _T:
        return await self._write(operation)

    async def _read(self, query: Callable[[_Connection], _T]) -> _T:
        return await self._run(lambda conn, attempt: query(conn), write=False)

    async def _write(self, change: Callable[[_Connection], _T]) -> _T:
        def in_transaction(conn: _Connection, attempt: _Attempt) -> _T:
            with _transaction(conn, attempt):
                return change(conn)

        return await self._run(in_transaction, write=True)

    async def _run(self, operation: Callable[[_Connection, _Attempt], _T], *, write: bool) -> _T:
        with _map_store_errors():
            for delay in _RETRY_DELAYS_S:
                attempt = _Attempt(write=write)
                try:
                    return await self._attempt(operation, attempt)
                except psycopg.Error as exc:
                    if not _may_retry(exc, attempt):
                        raise
                    logger.warning(
                        "[GEN] storage: %s: %s; trying again in %.2f s",
                        type(exc).__name__,
                        _one_line(exc),
                        delay,
                        extra={"action": "store_retry"},
                    )
                await trio.sleep(delay)
            return await self._attempt(operation, _Attempt(write=write))

    async def _attempt(
        self, operation: Callable[[_Connection, _Attempt], _T], attempt: _Attempt
    ) -> _T:
        if self._pool is None:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailableError("the store is closed")
        return await trio.to_thread.run_sync(
            self._call,
            operation,
            attempt,
            limiter=self._limiter,
            abandon_on_cancel=not attempt.write,
        )

    def _call(self, operation: Callable[[_Connection, _Attempt], _T], attempt: _Attempt) -> _T:
        # Runs in the worker thread, after the limiter let it in: the store may have been
        # closed while this call waited for its turn.
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("the store is closed")
        conn = _getconn(pool, self._getconn_timeout_s)
        try:
            return operation(conn, attempt)
        finally:
            attempt.connection_lost = conn.broken
            pool.putconn(conn)

    async def ping(self) -> None:
        """Run ``SELECT 1``."""
        await self._read(partial(_fetch_all, _PING, {}))

    async def create_job(self, new: NewJob) -> tuple[Job, bool]:
        """Store ``new``; see :meth:`JobStore.create_job`.

        A job with the same id, idempotency key or task id is returned as it is, with
        ``False``, also when another instance stores it at the same moment. A job created
        with a task id starts ``pending``, else ``submitting``.
        """
        params = new_job_values(new)
        return await self._write(partial(_create_job, params=params))

    async def get_job(self, job_id: JobId) -> Job | None:
        return await self._read(partial(_select_job, job_id=job_id))

    async def get_job_by_task(self, task_id: TaskId) -> Job | None:
        return await self._read(partial(_select_job_by_task, task_id=task_id))

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
            params = {"states": None if states is None else _text_array(states), "limit": limit}
            for n, (key, value) in enumerate(metadata.items()):
                suffix = str(n)
                sql += _METADATA_MATCH.replace("key_N", "key_" + suffix).replace(
                    "value_N", "value_" + suffix
                )
                params["key_" + suffix] = key
                params["value_" + suffix] = value
            sql += " ORDER BY created_at DESC, seq DESC LIMIT %(limit)s"
        elif states is None:
            sql, params = _LIST_JOBS, {"limit": limit}
        else:
            sql, params = _LIST_JOBS_IN_STATES, {"states": _text_array(states), "limit": limit}
        return [job_from_row(r) for r in await self._read(partial(_fetch_all, sql, params))]

    async def unfinished_jobs(self) -> list[Job]:
        rows = await self._read(partial(_fetch_all, _UNFINISHED_JOBS, {"states": _ACTIVE}))
        return [job_from_row(r) for r in rows]

    async def attach_task(self, job_id: JobId, task_id: TaskId, *, now: float) -> Attached | None:
        """Record ``task_id`` and apply ``accepted``; see :meth:`JobStore.attach_task`.

        The task id is recorded whatever the job's state; only the state change is a
        compare-and-set. Repeating the call is harmless.

        Raises:
            ConflictError: another job tracks this task.
            StoreUnavailableError: the database failed.
        """
        return await self._write(partial(_attach_task, job_id=job_id, task_id=task_id, now=now))

    async def begin_submission(
        self, job_id: JobId, *, count: int, callback_url: str | None, now: float
    ) -> Job | None:
        params = {"id": job_id, "count": count, "callback_url": callback_url, "now": now}
        rows = await self._write(partial(_fetch_all, _BEGIN_SUBMISSION, params))
        return job_from_row(rows[0]) if rows else None

    async def end_submission(self, job_id: JobId, *, count: int, now: float) -> None:
        params = {"id": job_id, "count": count, "now": now}
        await self._write(partial(_execute, _END_SUBMISSION, params))

    async def apply(self, job_id: JobId, report: Report, *, now: float) -> Job | None:
        params = _report_params(report)
        return await self._write(partial(_apply_alone, job_id=job_id, report=params, now=now))

    async def note_error(self, job_id: JobId, message: str, *, now: float) -> None:
        params = {"id": job_id, "message": message, "now": now}
        await self._write(partial(_execute, _NOTE_ERROR, params))

    async def record_callback(self, entry: InboxEntry, report: Report | None) -> CallbackRecord:
        """Store ``entry`` and apply ``report``; see :meth:`JobStore.record_callback`.

        ``now`` for the job's change is ``entry.received_at``. A rejected callback looks
        nothing up; a callback with nothing to apply still names its job.

        Cancellation:
            Cancelled while it waits its turn, the callback is not written. Once its
            batch is being written, it is written, whether or not the caller waits.
        """
        params = None if report is None else _report_params(report)
        return await self._queue_callback((entry, params), max_batch=_MAX_CALLBACK_BATCH)

    async def _write_callback_batch(
        self, batch: list[_QueuedCallback]
    ) -> Sequence[CallbackRecord | Exception]:
        # trio.Cancelled comes only before a thread started, or between attempts (after
        # one that wrote nothing): nothing was written.
        return await self._run(partial(_record_callbacks, batch), write=True)

    async def list_callbacks(
        self, *, task_id: TaskId | None = None, job_id: JobId | None = None, limit: int = 100
    ) -> list[StoredCallback]:
        check_limit(limit)
        params: dict[str, object] = {"limit": limit}
        if task_id is None and job_id is None:
            sql = _LIST_CALLBACKS
        elif job_id is None:
            sql, params["task_id"] = _LIST_CALLBACKS_FOR_TASK, task_id
        elif task_id is None:
            sql, params["job_id"] = _LIST_CALLBACKS_FOR_JOB, job_id
        else:
            sql = _LIST_CALLBACKS_FOR_TASK_AND_JOB
            params.update(task_id=task_id, job_id=job_id)
        return [
            stored_callback_from_row(r) for r in await self._read(partial(_fetch_all, sql, params))
        ]

    async def list_events(self, *, after: int = 0, limit: int = 100) -> list[Event]:
        check_limit(limit)
        params = {"after": after, "limit": limit}
        return [
            event_from_row(r) for r in await self._read(partial(_fetch_all, _LIST_EVENTS, params))
        ]

    async def remember_signature(self, digest: str, *, seen_at: float) -> bool:
        params = {"digest": digest, "seen_at": seen_at}

        def remember(conn: _Connection) -> bool:
            return conn.execute(_REMEMBER_SIGNATURE, params).rowcount == 1

        return await self._write(remember)

    async def prune_signatures(self, *, before: float, limit: int) -> int:
        check_limit(limit)
        params = {"before": before, "limit": limit}

        def prune(conn: _Connection) -> int:
            return conn.execute(_PRUNE_SIGNATURES, params).rowcount

        return await self._write(prune)

    async def prune_events(self, *, before: float, limit: int) -> int:
        check_limit(limit)

        def prune(conn: _Connection) -> int:
            return conn.execute(_PRUNE_EVENTS, {"before": before, "limit": limit}).rowcount

        return await self._write(prune)

    async def prune_jobs(self, *, before: float, limit: int) -> list[JobId]:
        check_limit(limit)
        params = {"before": before, "limit": limit}
        return await self._write(partial(_prune_jobs, params=params))

    async def prune_deliveries(self, *, before: float, limit: int) -> int:
        return await self._prune(_PRUNE_DELIVERIES, before=before, limit=limit)

    async def prune_inbox(self, *, before: float, limit: int) -> int:
        return await self._prune(_PRUNE_INBOX, before=before, limit=limit)

    async def _prune(self, sql: LiteralString, *, before: float, limit: int) -> int:
        check_limit(limit)

        def prune(conn: _Connection) -> int:
            return conn.execute(sql, {"before": before, "limit": limit}).rowcount

        return await self._write(prune)

    async def count_prunable(self, kind: PruneKind, *, before: float) -> Prunable:
        rows = await self._read(partial(_fetch_all, _COUNT_PRUNABLE[kind], {"before": before}))
        count, oldest = rows[0]
        return Prunable(count=count, oldest=oldest)

    async def set_archive_mode(self, mode: ArchiveMode) -> None:
        await self._write(partial(_execute, _PUT_STATE, {"name": "archive", "value": mode}))

    async def due_archives(self, *, now: float, limit: int) -> list[Job]:
        check_limit(limit)
        params = {"now": now, "limit": limit}
        return [
            job_from_row(r) for r in await self._read(partial(_fetch_all, _DUE_ARCHIVES, params))
        ]

    async def next_archive_at(self) -> float | None:
        rows = await self._read(partial(_fetch_all, _NEXT_ARCHIVE_AT, {}))
        value: float | None = rows[0][0]
        return value

    async def pending_archives(self) -> int:
        rows = await self._read(partial(_fetch_all, _PENDING_ARCHIVES, {}))
        return int(rows[0][0])

    async def finish_archive(
        self, job_id: JobId, files: Sequence[ArchivedFile], *, now: float
    ) -> Job | None:
        params = {"files": files_to_json(files), "now": now}
        return await self._write(
            partial(_end_archive, job_id=job_id, sql=_FINISH_ARCHIVE, params=params)
        )

    async def fail_archive(
        self, job_id: JobId, error: str, *, next_at: float | None, now: float
    ) -> Job | None:
        sql = _ARCHIVE_GIVE_UP if next_at is None else _ARCHIVE_LATER
        params = {"error": error, "next_at": next_at, "now": now}
        return await self._write(partial(_end_archive, job_id=job_id, sql=sql, params=params))

    async def retry_archives(self, job_ids: Collection[JobId] | None, *, now: float) -> list[JobId]:
        ids = None if job_ids is None else list(job_ids)
        return await self._write(partial(_retry_archives, job_ids=ids, now=now))

    async def archive_trash(self, *, limit: int) -> list[tuple[JobId, list[str]]]:
        check_limit(limit)
        rows = await self._read(partial(_fetch_all, _ARCHIVE_TRASH, {"limit": limit}))
        return [(JobId(job_id), trash_keys(files)) for job_id, files in rows]

    async def forget_archive_trash(self, job_ids: Collection[JobId]) -> None:
        await self._write(partial(_forget_archive_trash, job_ids=list(job_ids)))

    async def aclose(self) -> None:
        """Close the pool. Idempotent.

        Operations already running finish on their connections, which are closed as they
        come back; operations after this raise ``StoreUnavailableError``.

        Cancellation:
            Cancelled while the pool closes, the closing finishes in its thread.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            await trio.lowlevel.checkpoint()
            return
        with _map_store_errors():
            await trio.to_thread.run_sync(
                partial(pool.close, timeout=_CLOSE_TIMEOUT_S), abandon_on_cancel=True
            )
