"""The database schema, as ordered migrations per SQL dialect.

Migration ``n`` (counting from 1) is ``MIGRATIONS[dialect][n - 1]``. A backend applies the
ones a database has not seen yet, in order, in one transaction, and records each version it
applied. Released migrations are never edited: a schema change is a new entry at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, LiteralString

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["MIGRATIONS", "POSTGRES_MIGRATIONS", "SQLITE_MIGRATIONS"]

_SQLITE_0001: Final[LiteralString] = """
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    family          TEXT NOT NULL,
    model           TEXT,
    task_id         TEXT,
    state           TEXT NOT NULL CHECK (state IN (
                        'submitting', 'pending', 'succeeded', 'failed', 'timed_out', 'cancelled'
                    )),
    request         TEXT,                       -- JSON object, or NULL
    metadata        TEXT,                       -- JSON object, or NULL
    idempotency_key TEXT,
    created_at      REAL NOT NULL,              -- epoch seconds
    updated_at      REAL NOT NULL,
    deadline_at     REAL NOT NULL,
    kie_state       TEXT,
    result_urls     TEXT NOT NULL DEFAULT '[]', -- JSON array of strings
    result          TEXT,                       -- any JSON value; NULL for null
    error_code      TEXT,
    error_message   TEXT,
    ended_by        TEXT,
    ended_at        REAL,
    late            INTEGER NOT NULL DEFAULT 0 CHECK (late IN (0, 1)),
    last_error      TEXT
);

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE UNIQUE INDEX jobs_task_id ON jobs (task_id) WHERE task_id IS NOT NULL;

CREATE INDEX jobs_state ON jobs (state, deadline_at);

CREATE INDEX jobs_created_at ON jobs (created_at);

CREATE TABLE callback_inbox (
    id              INTEGER PRIMARY KEY,
    received_at     REAL NOT NULL,
    body            BLOB NOT NULL,
    body_size       INTEGER NOT NULL,
    content_type    TEXT,
    query           TEXT NOT NULL,
    remote          TEXT,
    task_id         TEXT,
    found_by        TEXT,
    job_id          TEXT,
    outcome         TEXT NOT NULL,
    problem         TEXT,
    authenticated   INTEGER NOT NULL CHECK (authenticated IN (0, 1)),
    auth            TEXT NOT NULL,
    effect          TEXT NOT NULL,
    matched_job_id  TEXT REFERENCES jobs (id) ON DELETE SET NULL,
    -- the report the callback carried, so that it can be applied later to a job
    -- that did not exist yet when it arrived
    event           TEXT,
    kie_state       TEXT,
    result_urls     TEXT,                       -- JSON array of strings
    result          TEXT,                       -- any JSON value; NULL for null
    error_code      TEXT,
    error_message   TEXT
);

CREATE INDEX callback_inbox_task_id ON callback_inbox (task_id);

CREATE INDEX callback_inbox_matched_job_id ON callback_inbox (matched_job_id);
"""

# A createTask in flight is recorded before it is sent, so that a leader that takes over
# knows a task may exist that no answer named; tasks reported for a job that it does not
# follow are kept beside it.
_SQLITE_0002: Final[LiteralString] = """
ALTER TABLE jobs ADD COLUMN submit_sent_at REAL;

ALTER TABLE jobs ADD COLUMN submit_count INTEGER NOT NULL DEFAULT 0;

ALTER TABLE jobs ADD COLUMN submit_callback_url TEXT;

ALTER TABLE jobs ADD COLUMN other_task_ids TEXT NOT NULL DEFAULT '[]';
"""

# The event log, written in the same transaction as each job change it tells of; the
# cursor only grows (AUTOINCREMENT: never reused, even after the newest rows are pruned).
_SQLITE_0003: Final[LiteralString] = """
CREATE TABLE events (
    cursor      INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    job_id      TEXT NOT NULL,
    job         TEXT NOT NULL                   -- JSON: the job as the API showed it
);

CREATE INDEX events_created_at ON events (created_at);

CREATE INDEX callback_inbox_job_id ON callback_inbox (job_id);
"""

# Webhook deliveries: one row per event and endpoint, every attempt recorded; kied_state
# holds the notifier's cursor in the event log and the endpoints that asked to be disabled.
_SQLITE_0004: Final[LiteralString] = """
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL,
    event_cursor    INTEGER NOT NULL,
    job_id          TEXT NOT NULL,
    type            TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    REAL,
    UNIQUE (event_id, endpoint)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);

CREATE INDEX webhook_deliveries_created_at ON webhook_deliveries (created_at);

CREATE TABLE webhook_attempts (
    id              INTEGER PRIMARY KEY,
    delivery_id     INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at    REAL NOT NULL,
    status_code     INTEGER,
    duration_s      REAL NOT NULL,
    error           TEXT
);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

CREATE TABLE kied_state (
    name            TEXT PRIMARY KEY,
    value           TEXT NOT NULL
);
"""

# Hardening. A webhook signature is accepted once: its digest is kept for the signature's
# window. An HMAC-only callback does not end a job by itself: it asks the leader to confirm
# the outcome with one status query (confirm_requested_at). Rejected callbacks keep only
# what diagnosis needs: headers without secrets, and the whole body's hash beside a prefix.
# A callback kept in the local journal while the database was away is replayed once
# (journal_id). Retention prunes by these indexes.
_SQLITE_0005: Final[LiteralString] = """
CREATE TABLE callback_signatures (
    digest          TEXT PRIMARY KEY,
    seen_at         REAL NOT NULL
);

CREATE INDEX callback_signatures_seen_at ON callback_signatures (seen_at);

ALTER TABLE jobs ADD COLUMN confirm_requested_at REAL;

ALTER TABLE callback_inbox ADD COLUMN headers TEXT;             -- JSON object, or NULL

ALTER TABLE callback_inbox ADD COLUMN body_sha256 TEXT;

ALTER TABLE callback_inbox ADD COLUMN journal_id TEXT;

CREATE UNIQUE INDEX callback_inbox_journal_id ON callback_inbox (journal_id)
    WHERE journal_id IS NOT NULL;

CREATE INDEX callback_inbox_received_at ON callback_inbox (received_at);

CREATE INDEX jobs_ended_at ON jobs (ended_at) WHERE ended_at IS NOT NULL;
"""

# Result files kept by kied. A succeeded job with result URLs is marked pending when
# archiving is on (kied_state 'archive', written by the daemon at start); the leader's
# archiver downloads and stores the files, then writes them here (files: a JSON array),
# with job.archived (and the job.succeeded it held back, with KIED_NOTIFY_AFTER_ARCHIVE).
# A deleted job's files are listed in archive_trash until the pruner deleted them.
_SQLITE_0006: Final[LiteralString] = """
ALTER TABLE jobs ADD COLUMN files TEXT;                          -- JSON array, or NULL

ALTER TABLE jobs ADD COLUMN archive_state TEXT
    CHECK (archive_state IN ('pending', 'archived', 'failed'));

ALTER TABLE jobs ADD COLUMN archive_attempts INTEGER NOT NULL DEFAULT 0;

ALTER TABLE jobs ADD COLUMN archive_next_at REAL;

ALTER TABLE jobs ADD COLUMN archive_owed_event TEXT;

CREATE INDEX jobs_archive_due ON jobs (archive_next_at) WHERE archive_state = 'pending';

CREATE TABLE archive_trash (
    job_id          TEXT PRIMARY KEY,
    files           TEXT NOT NULL                                -- JSON array
);
"""

#: SQLite migrations, oldest first.
SQLITE_MIGRATIONS: Final[tuple[LiteralString, ...]] = (
    _SQLITE_0001,
    _SQLITE_0002,
    _SQLITE_0003,
    _SQLITE_0004,
    _SQLITE_0005,
    _SQLITE_0006,
)

# The same tables as SQLite's. JSON is kept as the text Python wrote, as in SQLite: jsonb
# would refuse values Python's json reads and writes (NaN, "\u0000") and change others
# (key order; 1e300 would read back as an integer). ``seq`` gives jobs the insertion order
# that SQLite's rowid gives them, to order jobs created in the same second.
_POSTGRES_0001: Final[LiteralString] = """
CREATE TABLE jobs (
    id              text PRIMARY KEY,
    seq             bigint GENERATED ALWAYS AS IDENTITY,
    family          text NOT NULL,
    model           text,
    task_id         text,
    state           text NOT NULL CHECK (state IN (
                        'submitting', 'pending', 'succeeded', 'failed', 'timed_out', 'cancelled'
                    )),
    request         text,                       -- JSON object, or NULL
    metadata        text,                       -- JSON object, or NULL
    idempotency_key text,
    created_at      double precision NOT NULL,  -- epoch seconds
    updated_at      double precision NOT NULL,
    deadline_at     double precision NOT NULL,
    kie_state       text,
    result_urls     text NOT NULL DEFAULT '[]', -- JSON array of strings
    result          text,                       -- any JSON value; NULL for null
    error_code      text,
    error_message   text,
    ended_by        text,
    ended_at        double precision,
    late            boolean NOT NULL DEFAULT false,
    last_error      text
);

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE UNIQUE INDEX jobs_task_id ON jobs (task_id) WHERE task_id IS NOT NULL;

CREATE INDEX jobs_state ON jobs (state, deadline_at);

CREATE INDEX jobs_created_at ON jobs (created_at, seq);

CREATE TABLE callback_inbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at     double precision NOT NULL,
    body            bytea NOT NULL,
    body_size       bigint NOT NULL,
    content_type    text,
    query           text NOT NULL,
    remote          text,
    task_id         text,
    found_by        text,
    job_id          text,
    outcome         text NOT NULL,
    problem         text,
    authenticated   boolean NOT NULL,
    auth            text NOT NULL,
    effect          text NOT NULL,
    matched_job_id  text REFERENCES jobs (id) ON DELETE SET NULL,
    -- the report the callback carried, so that it can be applied later to a job
    -- that did not exist yet when it arrived
    event           text,
    kie_state       text,
    result_urls     text,                       -- JSON array of strings
    result          text,                       -- any JSON value; NULL for null
    error_code      text,
    error_message   text
);

CREATE INDEX callback_inbox_task_id ON callback_inbox (task_id);

CREATE INDEX callback_inbox_matched_job_id ON callback_inbox (matched_job_id);

-- Every new job, and every change of a job's state, task id or KIE state, is announced on
-- the kied_jobs channel with the job id, when its transaction commits, so that the other
-- instances hear of it (a note on an error, last_error alone, is not announced).
CREATE FUNCTION kied_announce_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kied_jobs', NEW.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_announce_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION kied_announce_job();

CREATE TRIGGER jobs_announce_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN ((OLD.state, OLD.task_id, OLD.kie_state)
          IS DISTINCT FROM (NEW.state, NEW.task_id, NEW.kie_state))
    EXECUTE FUNCTION kied_announce_job();
"""

_POSTGRES_0002: Final[LiteralString] = """
ALTER TABLE jobs ADD COLUMN submit_sent_at double precision;

ALTER TABLE jobs ADD COLUMN submit_count integer NOT NULL DEFAULT 0;

ALTER TABLE jobs ADD COLUMN submit_callback_url text;

ALTER TABLE jobs ADD COLUMN other_task_ids text NOT NULL DEFAULT '[]';
"""

# The event log. Cursors must grow in commit order, or a reader resuming after cursor N
# could miss an N-1 that committed later: every transaction that appends an event takes
# one transaction-level advisory lock first, so appends commit one after the other.
# kied_metadata_matches() reads metadata that may not be valid jsonb (NaN) as no match.
_POSTGRES_0003: Final[LiteralString] = """
CREATE TABLE events (
    cursor      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text NOT NULL UNIQUE,
    type        text NOT NULL,
    created_at  double precision NOT NULL,
    job_id      text NOT NULL,
    job         text NOT NULL                   -- JSON: the job as the API showed it
);

CREATE INDEX events_created_at ON events (created_at);

CREATE INDEX callback_inbox_job_id ON callback_inbox (job_id);

CREATE FUNCTION kied_metadata_matches(metadata text, k text, v text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    found jsonb;
BEGIN
    IF metadata IS NULL THEN
        RETURN false;
    END IF;
    BEGIN
        found := metadata::jsonb -> k;
    EXCEPTION WHEN others THEN
        RETURN false;
    END;
    RETURN CASE jsonb_typeof(found)
        WHEN 'string' THEN found #>> '{}' = v
        WHEN 'number' THEN found::text = v
        WHEN 'boolean' THEN found::text = v
        ELSE false
    END;
END
$$;
"""

_POSTGRES_0004: Final[LiteralString] = """
CREATE TABLE webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text NOT NULL,
    event_cursor    bigint NOT NULL,
    job_id          text NOT NULL,
    type            text NOT NULL,
    endpoint        text NOT NULL,
    body            text NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    created_at      double precision NOT NULL,
    updated_at      double precision NOT NULL,
    last_status     integer,
    last_error      text,
    delivered_at    double precision,
    UNIQUE (event_id, endpoint)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);

CREATE INDEX webhook_deliveries_created_at ON webhook_deliveries (created_at);

CREATE TABLE webhook_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at    double precision NOT NULL,
    status_code     integer,
    duration_s      double precision NOT NULL,
    error           text
);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);

CREATE TABLE kied_state (
    name            text PRIMARY KEY,
    value           text NOT NULL
);
"""

# As _SQLITE_0005; a request to confirm is announced like a change of state, so that the
# leader hears of it whichever instance took the callback.
_POSTGRES_0005: Final[LiteralString] = """
CREATE TABLE callback_signatures (
    digest          text PRIMARY KEY,
    seen_at         double precision NOT NULL
);

CREATE INDEX callback_signatures_seen_at ON callback_signatures (seen_at);

ALTER TABLE jobs ADD COLUMN confirm_requested_at double precision;

ALTER TABLE callback_inbox ADD COLUMN headers text;

ALTER TABLE callback_inbox ADD COLUMN body_sha256 text;

ALTER TABLE callback_inbox ADD COLUMN journal_id text;

CREATE UNIQUE INDEX callback_inbox_journal_id ON callback_inbox (journal_id)
    WHERE journal_id IS NOT NULL;

CREATE INDEX callback_inbox_received_at ON callback_inbox (received_at);

CREATE INDEX jobs_ended_at ON jobs (ended_at) WHERE ended_at IS NOT NULL;

DROP TRIGGER jobs_announce_update ON jobs;

CREATE TRIGGER jobs_announce_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN ((OLD.state, OLD.task_id, OLD.kie_state, OLD.confirm_requested_at)
          IS DISTINCT FROM (NEW.state, NEW.task_id, NEW.kie_state, NEW.confirm_requested_at))
    EXECUTE FUNCTION kied_announce_job();
"""

# As _SQLITE_0006; a change of the files' state is announced, so that waiters on other
# instances see job.archived.
_POSTGRES_0006: Final[LiteralString] = """
ALTER TABLE jobs ADD COLUMN files text;

ALTER TABLE jobs ADD COLUMN archive_state text
    CHECK (archive_state IN ('pending', 'archived', 'failed'));

ALTER TABLE jobs ADD COLUMN archive_attempts integer NOT NULL DEFAULT 0;

ALTER TABLE jobs ADD COLUMN archive_next_at double precision;

ALTER TABLE jobs ADD COLUMN archive_owed_event text;

CREATE INDEX jobs_archive_due ON jobs (archive_next_at) WHERE archive_state = 'pending';

CREATE TABLE archive_trash (
    job_id          text PRIMARY KEY,
    files           text NOT NULL
);

DROP TRIGGER jobs_announce_update ON jobs;

CREATE TRIGGER jobs_announce_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN ((OLD.state, OLD.task_id, OLD.kie_state, OLD.confirm_requested_at, OLD.archive_state)
          IS DISTINCT FROM
          (NEW.state, NEW.task_id, NEW.kie_state, NEW.confirm_requested_at, NEW.archive_state))
    EXECUTE FUNCTION kied_announce_job();
"""

#: PostgreSQL migrations, oldest first.
POSTGRES_MIGRATIONS: Final[tuple[LiteralString, ...]] = (
    _POSTGRES_0001,
    _POSTGRES_0002,
    _POSTGRES_0003,
    _POSTGRES_0004,
    _POSTGRES_0005,
    _POSTGRES_0006,
)

#: Migrations by dialect name.
MIGRATIONS: Final[Mapping[str, tuple[LiteralString, ...]]] = {
    "sqlite": SQLITE_MIGRATIONS,
    "postgres": POSTGRES_MIGRATIONS,
}
