"""One frozen Settings object, built from the environment and flags, validated at start.

Only the entry point reads ``os.environ``; it hands the mapping to :func:`load_settings`,
which is pure. A bad value raises :class:`~kied.errors.ConfigError` naming the setting.
"""

from __future__ import annotations

import argparse
import ipaddress
import os.path
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

from kied.core.jobs import EventType
from kied.core.webhooks import DEFAULT_SCHEDULE_S, parse_secret
from kied.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "ENVIRONMENT_HELP",
    "TERMINAL_EVENTS",
    "DirArchiveSettings",
    "FileLockSettings",
    "LogFormat",
    "NoLockSettings",
    "PgLockSettings",
    "PostgresStoreSettings",
    "ResubmitPolicy",
    "S3ArchiveSettings",
    "Settings",
    "SqliteStoreSettings",
    "check_exposure",
    "is_loopback",
    "load_settings",
    "masked_url",
    "serve_parser",
]

SECONDS = 1.0
MIB = 1024 * 1024
#: the events webhooks tell of unless told otherwise: the ones that end a job
TERMINAL_EVENTS: frozenset[str] = frozenset(
    e.value
    for e in EventType
    if e not in (EventType.CREATED, EventType.SUBMITTED, EventType.ARCHIVED)
)

#: ``text``: plain lines; ``json``: one JSON object per line, for log shippers
LogFormat = Literal["text", "json"]
#: What a leader does with a createTask whose answer was lost (the previous leader stopped,
#: or KIE did not answer): ``never`` create the task again (wait for the orphan's callback
#: until the job's deadline), or create it again ``after-wait`` (``resubmit_wait_s``).
ResubmitPolicy = Literal["never", "after-wait"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SqliteStoreSettings:
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresStoreSettings:
    #: a libpq URL (postgresql://...) or key=value connection string
    url: str
    #: most connections, and worker threads, the store uses at once
    pool_size: int = 10
    #: bound on opening one connection, and on waiting for one from the pool
    connect_timeout_s: float = 5 * SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class FileLockSettings:
    path: Path
    retry_s: float = 0.5 * SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class PgLockSettings:
    #: how often a PASSIVE instance tries to take the lock
    retry_s: float = 0.25 * SECONDS
    #: how often the leader proves the lock is still held
    heartbeat_s: float = 1.0 * SECONDS
    #: how long that proof may take before the leader steps down
    heartbeat_timeout_s: float = 2.0 * SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class NoLockSettings:
    """No lock: this instance is always ACTIVE (tests, or one process that knows it is alone)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DirArchiveSettings:
    """Result files kept in a local directory (``KIED_ARCHIVE=dir:PATH``)."""

    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class S3ArchiveSettings:
    """Result files kept in an S3 bucket (``KIED_ARCHIVE=s3://bucket/prefix``), with the
    usual AWS variables."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: how long a redirect to a file (a presigned URL) serves it
    presign_expires_s: float = 300 * SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    store: SqliteStoreSettings | PostgresStoreSettings
    lock: FileLockSettings | PgLockSettings | NoLockSettings
    callback_token: str | None = None
    webhook_hmac_key: bytes | None = None
    webhook_max_skew_s: float = 300 * SECONDS
    kie_api_key: str | None = None
    kie_base_url: str = "https://api.kie.ai"
    public_url: str | None = None
    api_token: str | None = None
    #: how long a job may take, counted from when kied sends its createTask to KIE (the
    #: time it waits in kied's own createTask queue is not counted)
    job_timeout_s: float = 900 * SECONDS
    #: the longest a job waits in kied's createTask queue (KIE's 20 new tasks per 10 s),
    #: from its creation, when that is longer than its timeout; then it is timed_out
    create_queue_max_s: float = 3600 * SECONDS
    #: what to do with a createTask whose answer was lost; see :data:`ResubmitPolicy`
    resubmit: ResubmitPolicy = "never"
    #: with ``after-wait``: how long after the lost createTask was sent kied waits for its
    #: task's callback (which names the job) before it creates the task again
    resubmit_wait_s: float = 300 * SECONDS
    #: how long events are kept in the event log (GET /v1/events, webhooks)
    event_retention_s: float = 7 * 86400 * SECONDS
    #: endpoints told of every job event (Standard Webhooks); each job may name its own too
    webhook_urls: tuple[str, ...] = ()
    #: the keys webhooks are signed with (decoded ``whsec_…``); several while rotating
    webhook_keys: tuple[bytes, ...] = field(default=(), repr=False)
    #: the event types the endpoints of ``webhook_urls`` are told of
    webhook_events: frozenset[str] = TERMINAL_EVENTS
    #: the delay before each attempt of a delivery (the first is usually 0)
    webhook_schedule_s: tuple[float, ...] = DEFAULT_SCHEDULE_S
    #: one attempt, from sending to the answer
    webhook_timeout_s: float = 15 * SECONDS
    #: deliveries in flight to one endpoint at once
    webhook_concurrency: int = 4
    max_callback_bytes: int = 1 * MIB
    oversized_keep_bytes: int = 64 * 1024
    #: hypercorn's bound for in-flight requests once shutdown begins
    graceful_timeout_s: float = 5 * SECONDS
    #: the whole stop, signal to exit, is bounded by this
    shutdown_grace_s: float = 10 * SECONDS
    #: bound for shielded cleanup (lock release, closing storage)
    cleanup_s: float = 2 * SECONDS
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    #: systemd's notification socket (a path, or @name for an abstract one); None outside systemd
    notify_socket: str | None = None
    #: systemd's watchdog timeout; kied pings at half of it. None: no watchdog
    watchdog_s: float | None = None
    #: sockets passed by socket activation, from fd 3 on; 0: kied binds host:port itself
    listen_fds: int = 0
    #: how long an ended job is kept (from its end), and webhook deliveries (from when
    #: they were made); None: forever
    job_retention_s: float | None = 30 * 86400 * SECONDS
    #: how long a callback is kept in the inbox (from its arrival); None: forever
    inbox_retention_s: float | None = 14 * 86400 * SECONDS
    #: the operator means kied to listen beyond this machine without an API token or
    #: without callback authentication (``KIED_ALLOW_OPEN=1``); otherwise it refuses to
    #: start that way
    allow_open: bool = False
    #: bearer token ``GET /metrics`` requires; None: loopback clients, or KIED_API_TOKEN
    metrics_token: str | None = field(default=None, repr=False)
    #: a job whose task KIE has not known for this long (and three status queries in a
    #: row) is failed with ``unknown_task`` rather than queried until its deadline
    unknown_task_grace_s: float = 120 * SECONDS
    #: status queries a second the pollers spend, all jobs together, over any 10 s: KIE
    #: allows 10 a second per key, and the rest is the application's (within the 10 s a
    #: catch-up may go at the client's own limit, 10 per 1.05 s)
    status_queries_per_s: float = 8.0
    #: unauthenticated callbacks stored per minute at most (beyond: answered, counted, dropped)
    rejected_per_minute: int = 600
    #: bound on the body of any /v1 request (413 beyond it)
    max_request_bytes: int = 1 * MIB
    #: where callbacks are kept while storage is down; None: beside the SQLite file, or
    #: $STATE_DIRECTORY (else ./var) with PostgreSQL
    journal_dir: Path | None = None
    #: bound on the journal's size (beyond: answered, counted, dropped)
    journal_max_bytes: int = 256 * MIB
    #: where succeeded jobs' result files are kept; None: not kept (only KIE's URLs)
    archive: DirArchiveSettings | S3ArchiveSettings | None = None
    #: hosts (``host`` or ``host:port``, lower case) files may be downloaded from even
    #: though they resolve to a loopback, private or otherwise internal address
    archive_allow_hosts: frozenset[str] = frozenset()
    #: bound on one result file (the announced length, and the bytes counted)
    archive_max_bytes: int = 1024 * MIB
    #: bound on downloading and storing one file, whatever its size
    archive_file_timeout_s: float = 600 * SECONDS
    #: files downloaded at once
    archive_concurrency: int = 4
    #: ``job.succeeded`` is written once the job's files are kept (or kied gave up)
    notify_after_archive: bool = False
    #: how often the leader reads storage for due archiving besides being woken (work a
    #: previous leader or ``kied archive --retry-failed`` left, retries)
    archive_scan_s: float = 30 * SECONDS


ENVIRONMENT_HELP = """\
environment (flags win over the environment):
  PORT                 port to listen on (Render sets it); default 8080
  KIED_HOST            address to bind; default 0.0.0.0 when PORT is set, else 127.0.0.1
  KIED_DATABASE_URL    sqlite:///ABSOLUTE/PATH, a plain file path, or postgresql://...
  DATABASE_URL         used when KIED_DATABASE_URL is not set
                       default: $STATE_DIRECTORY/kied.db when set, else ./var/kied.db
  KIED_LOCK            postgres (an advisory lock; default with a PostgreSQL database),
                       file (a lock file beside the SQLite file; default otherwise),
                       file:PATH, none
  KIED_CALLBACK_TOKEN  secret a callback must carry as ?token= or X-KIE-Callback-Token;
                       it, or KIE_WEBHOOK_HMAC_KEY, is needed when listening beyond this
                       machine (see KIED_ALLOW_OPEN)
  KIE_WEBHOOK_HMAC_KEY KIE's webhookHmacKey: callbacks must carry a valid X-Webhook-Signature
  KIE_API_KEY          KIE API key
  KIE_BASE_URL         default https://api.kie.ai
  KIED_PUBLIC_URL      this daemon's public URL, for the callback URL given to KIE
  RENDER_EXTERNAL_URL  used when KIED_PUBLIC_URL is not set
  KIED_API_TOKEN       bearer token the /v1 API requires; needed when listening beyond
                       this machine (see KIED_ALLOW_OPEN)
  KIED_JOB_TIMEOUT     seconds a job may take before it is timed_out, counted from when
                       kied sends its createTask (not its wait in kied's queue); default 900
  KIED_CREATE_QUEUE_MAX  seconds a job may wait in kied's createTask queue (KIE allows 20
                       new tasks per 10 s), from its creation, when longer than its
                       timeout; then it is timed_out; default 3600
  KIED_RESUBMIT        never (default) or after-wait: what a leader does with a createTask
                       whose answer was lost (kied stopped, or KIE did not answer). never:
                       wait for that task's callback until the job's deadline, never pay
                       twice; after-wait: create the task again after KIED_RESUBMIT_WAIT
  KIED_RESUBMIT_WAIT   seconds after-wait waits for the lost task's callback; default 300
  KIED_EVENT_RETENTION_DAYS  days the event log keeps an event; default 7
  KIED_JOB_RETENTION_DAYS    days an ended job and its webhook deliveries are kept;
                             default 30; 0 or never: forever
  KIED_INBOX_RETENTION_DAYS  days a received callback is kept; default 14; 0 or never:
                             forever
  KIED_WEBHOOK_URL     endpoint(s), comma-separated, told of job events (Standard Webhooks)
  KIED_WEBHOOK_SECRET  whsec_BASE64 key(s) webhooks are signed with; several (space- or
                       comma-separated) while rotating; needed for any webhook
  KIED_WEBHOOK_EVENTS  event types sent to KIED_WEBHOOK_URL, comma-separated; default the
                       terminal ones (job.succeeded,job.failed,job.timed_out,job.cancelled,
                       job.updated); "all" for every type
  KIED_WEBHOOK_RETRY_SCHEDULE  seconds before each attempt; default 0,5,300,1800,7200,
                       18000,36000,36000
  KIED_LOG_LEVEL       DEBUG, INFO (default), WARNING, ERROR
  KIED_LOG_FORMAT      text (default) or json: one JSON object per line
  KIED_ALLOW_OPEN      1: listen beyond this machine without KIED_API_TOKEN or without
                       callback authentication on purpose; kied refuses to otherwise
  KIED_METRICS_TOKEN   bearer token GET /metrics requires; unset: /metrics answers
                       loopback clients, and others that send KIED_API_TOKEN
  KIED_UNKNOWN_TASK_GRACE  seconds KIE may not know a job's task (status query: no record)
                       before the job fails with unknown_task; default 120
  KIED_STATUS_QUERIES_PER_S  status queries a second kied plans to spend on all jobs
                       together (KIE allows 10 per key; the rest is the application's);
                       default 8, at most 9
  KIED_REJECTED_PER_MINUTE  unauthenticated callbacks kept per minute; default 600
  KIED_MAX_REQUEST_BYTES    bound on a /v1 request's body (413 beyond); default 1048576
  KIED_JOURNAL_DIR     where callbacks wait while the database is down; default beside
                       the SQLite file, else $STATE_DIRECTORY when set, else ./var
  KIED_JOURNAL_MAX_BYTES    bound on that journal; default 268435456 (256 MiB)
  KIED_ARCHIVE         where succeeded jobs' result files are kept: dir:PATH,
                       s3://BUCKET/PREFIX (with AWS_ENDPOINT_URL, AWS_REGION,
                       AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or
                       none; default dir: an "archive" directory beside the SQLite file,
                       none with PostgreSQL (instances share no disk)
  KIED_ARCHIVE_ALLOW_HOSTS  hosts (host or host:port, comma-separated) files may be
                       downloaded from although they are loopback or private addresses
  KIED_ARCHIVE_MAX_BYTES    bound on one result file; default 1073741824 (1 GiB)
  KIED_ARCHIVE_TIMEOUT seconds one file may take to download and store; default 600
  KIED_ARCHIVE_CONCURRENCY  files downloaded at once; default 4
  KIED_NOTIFY_AFTER_ARCHIVE 1: write job.succeeded (and its webhook) only once the
                       job's files are kept, or kied gave up on them
set by systemd:
  NOTIFY_SOCKET        where READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 are sent
  WATCHDOG_USEC        the watchdog timeout; kied pings at half of it (WATCHDOG_PID: for whom)
  LISTEN_FDS           sockets passed from fd 3 on (LISTEN_PID: for whom); served instead
                       of KIED_HOST and PORT
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("command line", message)


def serve_parser(prog: str = "kied serve") -> argparse.ArgumentParser:
    """The flags of ``kied serve``; bad flags raise ``ConfigError`` instead of exiting."""
    parser = _Parser(
        prog=prog,
        description="Run the kied daemon: HTTP first, then storage, then leadership.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help="address to bind (KIED_HOST)")
    parser.add_argument("--port", help="port to listen on, 0 for any free port (PORT)")
    parser.add_argument("--database", help="database URL or SQLite path (KIED_DATABASE_URL)")
    parser.add_argument("--lock", help="postgres, file, file:PATH or none (KIED_LOCK)")
    parser.add_argument(
        "--job-timeout", help="seconds before a job is timed_out (KIED_JOB_TIMEOUT)"
    )
    parser.add_argument("--archive", help="dir:PATH, s3://BUCKET/PREFIX or none (KIED_ARCHIVE)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (KIED_LOG_LEVEL)")
    parser.add_argument("--log-format", help="text or json (KIED_LOG_FORMAT)")
    return parser


def load_settings(
    environ: Mapping[str, str], argv: Sequence[str] = (), *, pid: int | None = None
) -> Settings:
    """Build and validate the settings of ``kied serve``.

    Args:
        environ: the process environment (only the entry point passes ``os.environ``).
        argv: the flags after ``kied serve``.
        pid: this process's id, which systemd's ``LISTEN_PID`` and ``WATCHDOG_PID`` must
            name; ``os.getpid()`` by default.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: a value is missing or wrong; the message names the setting.
    """
    flags = serve_parser().parse_args(list(argv))

    def pick(flag: str | None, *names: str) -> tuple[str, str] | None:
        if flag is not None:
            flag_name = names[0].lower().removeprefix("kied_").removesuffix("_url")
            return ("--" + flag_name.replace("_", "-"), flag)
        for name in names:
            value = environ.get(name)
            if value is not None and value.strip() != "":
                return (name, value.strip())
        return None

    port_src = pick(flags.port, "PORT")
    port = 8080 if port_src is None else _port(*port_src)
    if flags.port is not None:
        port_src = ("--port", flags.port)
    host_src = pick(flags.host, "KIED_HOST")
    host = host_src[1] if host_src else ("0.0.0.0" if environ.get("PORT") else "127.0.0.1")

    db_src = pick(flags.database, "KIED_DATABASE_URL", "DATABASE_URL")
    store = _store(db_src, environ)

    lock_src = pick(flags.lock, "KIED_LOCK")
    lock = _lock(lock_src, store, render=environ.get("RENDER", "").strip() != "")

    timeout_src = pick(flags.job_timeout, "KIED_JOB_TIMEOUT")
    job_timeout_s = 900.0 if timeout_src is None else _positive_seconds(*timeout_src)
    queue_src = pick(None, "KIED_CREATE_QUEUE_MAX")
    create_queue_max_s = 3600.0 if queue_src is None else _positive_seconds(*queue_src)

    resubmit_src = pick(None, "KIED_RESUBMIT")
    resubmit: ResubmitPolicy = "never"
    if resubmit_src is not None:
        if resubmit_src[1].lower() not in ("never", "after-wait"):
            raise ConfigError(
                resubmit_src[0], f"must be never or after-wait, not {resubmit_src[1]!r}"
            )
        resubmit = "never" if resubmit_src[1].lower() == "never" else "after-wait"
    wait_src = pick(None, "KIED_RESUBMIT_WAIT")
    resubmit_wait_s = 300.0 if wait_src is None else _positive_seconds(*wait_src)

    retention_src = pick(None, "KIED_EVENT_RETENTION_DAYS")
    event_retention_s = 7 * 86400.0
    if retention_src is not None:
        event_retention_s = _days(*retention_src) * 86400.0

    webhook_urls = _webhook_urls(pick(None, "KIED_WEBHOOK_URL"))
    webhook_keys = _webhook_keys(pick(None, "KIED_WEBHOOK_SECRET"))
    if webhook_urls and not webhook_keys:
        raise ConfigError(
            "KIED_WEBHOOK_SECRET",
            "KIED_WEBHOOK_URL is set: webhooks are signed, so a whsec_ secret is needed"
            " (for example: whsec_$(openssl rand -base64 32))",
        )
    webhook_events = _event_types(pick(None, "KIED_WEBHOOK_EVENTS"))
    schedule_src = pick(None, "KIED_WEBHOOK_RETRY_SCHEDULE")
    webhook_schedule_s = DEFAULT_SCHEDULE_S if schedule_src is None else _schedule(*schedule_src)

    level_src = pick(flags.log_level, "KIED_LOG_LEVEL")
    log_level = "INFO"
    if level_src is not None:
        log_level = level_src[1].upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                level_src[0], f"must be DEBUG, INFO, WARNING or ERROR, not {level_src[1]!r}"
            )

    format_src = pick(flags.log_format, "KIED_LOG_FORMAT")
    log_format: LogFormat = "text"
    if format_src is not None:
        if format_src[1].lower() not in ("text", "json"):
            raise ConfigError(format_src[0], f"must be text or json, not {format_src[1]!r}")
        log_format = "json" if format_src[1].lower() == "json" else "text"

    own_pid = os.getpid() if pid is None else pid
    notify_socket = _notify_socket(environ)
    watchdog_s = _watchdog_s(environ, own_pid) if notify_socket is not None else None
    listen_fds = _listen_fds(environ, own_pid)

    allow_open = _flag(pick(None, "KIED_ALLOW_OPEN"))
    metrics_token = _secret(environ, "KIED_METRICS_TOKEN")

    hmac_key = environ.get("KIE_WEBHOOK_HMAC_KEY", "").strip()
    public_src = pick(None, "KIED_PUBLIC_URL", "RENDER_EXTERNAL_URL")
    base_src = pick(None, "KIE_BASE_URL")
    job_retention_s = _retention(pick(None, "KIED_JOB_RETENTION_DAYS"), default_days=30)
    inbox_retention_s = _retention(pick(None, "KIED_INBOX_RETENTION_DAYS"), default_days=14)
    grace_src = pick(None, "KIED_UNKNOWN_TASK_GRACE")
    unknown_task_grace_s = 120.0 if grace_src is None else _positive_seconds(*grace_src)

    budget_src = pick(None, "KIED_STATUS_QUERIES_PER_S")
    status_queries_per_s = 8.0 if budget_src is None else _query_rate(*budget_src)

    rejected_src = pick(None, "KIED_REJECTED_PER_MINUTE")
    rejected_per_minute = 600 if rejected_src is None else _count(*rejected_src, low=0)
    request_src = pick(None, "KIED_MAX_REQUEST_BYTES")
    max_request_bytes = MIB if request_src is None else _count(*request_src, low=1024)
    journal_src = pick(None, "KIED_JOURNAL_DIR")
    journal_dir = None if journal_src is None else Path(os.path.abspath(journal_src[1]))
    if journal_dir is None and isinstance(store, PostgresStoreSettings):
        state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0].strip()
        journal_dir = Path(os.path.abspath(state_dir or "var"))
    journal_max_src = pick(None, "KIED_JOURNAL_MAX_BYTES")
    journal_max_bytes = (
        256 * MIB if journal_max_src is None else _count(*journal_max_src, low=64 * 1024)
    )
    archive = _archive(pick(flags.archive, "KIED_ARCHIVE"), store, environ)
    allow_src = pick(None, "KIED_ARCHIVE_ALLOW_HOSTS")
    archive_allow_hosts = frozenset() if allow_src is None else _hosts(*allow_src)
    max_src = pick(None, "KIED_ARCHIVE_MAX_BYTES")
    archive_max_bytes = 1024 * MIB if max_src is None else _count(*max_src, low=1)
    file_timeout_src = pick(None, "KIED_ARCHIVE_TIMEOUT")
    archive_file_timeout_s = (
        600.0 if file_timeout_src is None else _positive_seconds(*file_timeout_src)
    )
    concurrency_src = pick(None, "KIED_ARCHIVE_CONCURRENCY")
    archive_concurrency = 4 if concurrency_src is None else _count(*concurrency_src, low=1)
    notify_after_archive = _flag(pick(None, "KIED_NOTIFY_AFTER_ARCHIVE"))
    return Settings(
        host=host,
        port=port,
        store=store,
        lock=lock,
        callback_token=_secret(environ, "KIED_CALLBACK_TOKEN"),
        webhook_hmac_key=hmac_key.encode() if hmac_key else None,
        kie_api_key=_secret(environ, "KIE_API_KEY"),
        kie_base_url=_http_url(*base_src) if base_src else "https://api.kie.ai",
        public_url=_http_url(*public_src) if public_src else None,
        api_token=_secret(environ, "KIED_API_TOKEN"),
        job_timeout_s=job_timeout_s,
        create_queue_max_s=create_queue_max_s,
        resubmit=resubmit,
        resubmit_wait_s=resubmit_wait_s,
        event_retention_s=event_retention_s,
        webhook_urls=webhook_urls,
        webhook_keys=webhook_keys,
        webhook_events=webhook_events,
        webhook_schedule_s=webhook_schedule_s,
        log_level=log_level,
        log_format=log_format,
        notify_socket=notify_socket,
        watchdog_s=watchdog_s,
        listen_fds=listen_fds,
        job_retention_s=job_retention_s,
        inbox_retention_s=inbox_retention_s,
        allow_open=allow_open,
        metrics_token=metrics_token,
        unknown_task_grace_s=unknown_task_grace_s,
        status_queries_per_s=status_queries_per_s,
        rejected_per_minute=rejected_per_minute,
        max_request_bytes=max_request_bytes,
        journal_dir=journal_dir,
        journal_max_bytes=journal_max_bytes,
        archive=archive,
        archive_allow_hosts=archive_allow_hosts,
        archive_max_bytes=archive_max_bytes,
        archive_file_timeout_s=archive_file_timeout_s,
        archive_concurrency=archive_concurrency,
        notify_after_archive=notify_after_archive,
    )


def _archive(
    src: tuple[str, str] | None,
    store: SqliteStoreSettings | PostgresStoreSettings,
    environ: Mapping[str, str],
) -> DirArchiveSettings | S3ArchiveSettings | None:
    if src is None:
        if isinstance(store, PostgresStoreSettings):
            return None  # instances share no local disk; choose s3:// or dir: explicitly
        return DirArchiveSettings(path=store.path.with_name("archive"))
    name, value = src
    if value.lower() == "none":
        return None
    if value.startswith("dir:"):
        path = value[len("dir:") :]
        if not path:
            raise ConfigError(name, f"dir:PATH needs a directory, not {value!r}")
        return DirArchiveSettings(path=Path(os.path.abspath(path)))
    if value.startswith("s3://"):
        bucket, _, prefix = value[len("s3://") :].partition("/")
        if not bucket or not all(c.isalnum() or c in ".-_" for c in bucket):
            raise ConfigError(name, f"s3://BUCKET/PREFIX needs a bucket name, not {value!r}")
        if ".." in prefix.split("/") or "\\" in prefix:
            raise ConfigError(name, f"the prefix may not hold .. or backslashes: {value!r}")

        def aws(*names: str) -> str | None:
            for variable in names:
                found = environ.get(variable, "").strip()
                if found:
                    return found
            return None

        endpoint = aws("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if endpoint is not None:
            endpoint = _http_url(
                "AWS_ENDPOINT_URL_S3" if environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL",
                endpoint,
            )
        return S3ArchiveSettings(
            bucket=bucket,
            prefix=prefix.strip("/"),
            endpoint_url=endpoint,
            region=aws("AWS_REGION", "AWS_DEFAULT_REGION"),
            access_key_id=aws("AWS_ACCESS_KEY_ID"),
            secret_access_key=aws("AWS_SECRET_ACCESS_KEY"),
            session_token=aws("AWS_SESSION_TOKEN"),
        )
    raise ConfigError(name, f"must be dir:PATH, s3://BUCKET/PREFIX or none, not {value!r}")


def _hosts(name: str, value: str) -> frozenset[str]:
    hosts = set()
    for part in value.split(","):
        host = part.strip().lower()
        if not host:
            continue
        if "/" in host or "@" in host or " " in host:
            raise ConfigError(name, f"must be host or host:port names, not {part.strip()!r}")
        hosts.add(host)
    return frozenset(hosts)


def _port(name: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(name, f"must be a port number 0-65535, not {value!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(name, f"must be a port number 0-65535, not {value!r}")
    return port


def _count(name: str, value: str, *, low: int) -> int:
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, not {value!r}") from None
    if count < low:
        raise ConfigError(name, f"must be {low} or more, not {value!r}")
    return count


def _query_rate(name: str, value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise ConfigError(name, f"must be a number of queries a second, not {value!r}") from None
    if not 0 < rate <= 9:
        raise ConfigError(
            name, f"must be more than 0 and at most 9 (KIE allows 10 a second), not {value!r}"
        )
    return rate


def _positive_seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(name, f"must be a number of seconds, not {value!r}") from None
    if not 0 < seconds <= 30 * 24 * 3600:
        raise ConfigError(name, f"must be more than 0 and at most 30 days, not {value!r}")
    return seconds


def _webhook_urls(src: tuple[str, str] | None) -> tuple[str, ...]:
    if src is None:
        return ()
    name, value = src
    return tuple(_http_url(name, part.strip()) for part in value.split(",") if part.strip())


def _webhook_keys(src: tuple[str, str] | None) -> tuple[bytes, ...]:
    if src is None:
        return ()
    name, value = src
    keys = []
    for part in value.replace(",", " ").split():
        try:
            keys.append(parse_secret(part))
        except ValueError as exc:
            # The message never repeats the secret.
            raise ConfigError(name, str(exc)) from None
    return tuple(keys)


def _event_types(src: tuple[str, str] | None) -> frozenset[str]:
    if src is None:
        return TERMINAL_EVENTS
    name, value = src
    if value.strip().lower() == "all":
        return frozenset(e.value for e in EventType)
    wanted = frozenset(part.strip() for part in value.split(",") if part.strip())
    known = {e.value for e in EventType}
    unknown = sorted(wanted - known)
    if unknown or not wanted:
        raise ConfigError(
            name, f"unknown event type {unknown[0] if unknown else value!r}; one of {sorted(known)}"
        )
    return wanted


def _schedule(name: str, value: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise ConfigError(name, f"must be seconds separated by commas, not {value!r}") from None
    if not delays or not all(0 <= d <= 7 * 86400 for d in delays):
        raise ConfigError(name, f"must be 1 or more delays of 0 to 604800 seconds, not {value!r}")
    return delays


def _days(name: str, value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise ConfigError(name, f"must be a number of days, not {value!r}") from None
    if not 0 < days <= 3650:
        raise ConfigError(name, f"must be more than 0 and at most 3650 days, not {value!r}")
    return days


def _retention(src: tuple[str, str] | None, *, default_days: float) -> float | None:
    """Seconds to keep something, from days; None (forever) for ``0`` or ``never``."""
    if src is None:
        return default_days * 86400.0
    name, value = src
    if value.lower() == "never":
        return None
    try:
        days = float(value)
    except ValueError:
        raise ConfigError(name, f"must be a number of days, 0 or never, not {value!r}") from None
    if days == 0:
        return None
    if not 0 < days <= 3650:
        raise ConfigError(
            name, f"must be more than 0 and at most 3650 days, 0 or never, not {value!r}"
        )
    return days * 86400.0


def _for_us(environ: Mapping[str, str], name: str, pid: int) -> bool:
    """Whether systemd's ``*_PID`` variable ``name`` is unset or names this process."""
    value = environ.get(name, "").strip()
    if not value:
        return True
    try:
        return int(value) == pid
    except ValueError:
        raise ConfigError(name, f"must be a process id, not {value!r}") from None


def _notify_socket(environ: Mapping[str, str]) -> str | None:
    value = environ.get("NOTIFY_SOCKET", "").strip()
    if not value:
        return None
    if not value.startswith(("/", "@")) or len(value) < 2:
        raise ConfigError(
            "NOTIFY_SOCKET", f"must be an absolute socket path or an @abstract name, not {value!r}"
        )
    return value


def _watchdog_s(environ: Mapping[str, str], pid: int) -> float | None:
    value = environ.get("WATCHDOG_USEC", "").strip()
    if not value or not _for_us(environ, "WATCHDOG_PID", pid):
        return None
    try:
        usec = int(value)
    except ValueError:
        usec = 0
    if usec <= 0:
        raise ConfigError(
            "WATCHDOG_USEC", f"must be a positive number of microseconds, not {value!r}"
        )
    return usec / 1_000_000


def _listen_fds(environ: Mapping[str, str], pid: int) -> int:
    value = environ.get("LISTEN_FDS", "").strip()
    if not value or not _for_us(environ, "LISTEN_PID", pid):
        return 0
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count <= 0:
        raise ConfigError("LISTEN_FDS", f"must be a positive integer, not {value!r}")
    return count


def _secret(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _http_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(name, f"must be an http:// or https:// URL, not {value!r}")
    return value.rstrip("/")


def _store(
    src: tuple[str, str] | None, environ: Mapping[str, str]
) -> SqliteStoreSettings | PostgresStoreSettings:
    if src is None:
        state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0].strip()
        base = Path(state_dir) if state_dir else Path("var")
        return SqliteStoreSettings(path=Path(os.path.abspath(base / "kied.db")))
    name, value = src
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("postgres", "postgresql"):
        _check_postgres_url(name, value)
        return PostgresStoreSettings(url=value)
    if scheme == "sqlite":
        if not value.lower().startswith("sqlite:///") or len(value) <= len("sqlite:///"):
            raise ConfigError(name, f"a SQLite URL is sqlite:///ABSOLUTE/PATH, not {value!r}")
        # sqlite:///var/kied.db and SQLAlchemy's sqlite:////var/kied.db both mean /var/kied.db
        path = "/" + value[len("sqlite://") :].lstrip("/")
    elif "://" in value:
        raise ConfigError(
            name, f"must be sqlite:///PATH, postgresql://... or a file path, not {value!r}"
        )
    else:
        path = value
    if path.endswith("/"):
        raise ConfigError(name, f"names a directory, not a database file: {value!r}")
    return SqliteStoreSettings(path=Path(os.path.abspath(path)))


def masked_url(url: str) -> str:
    """A database URL with its password hidden, fit for a log line or an error."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def _check_postgres_url(name: str, value: str) -> None:
    """Refuse a PostgreSQL URL libpq would misread: kied would then retry it for ever."""
    userinfo, _, hosts = urlsplit(value).netloc.rpartition("@")
    if "@" in userinfo:
        # postgresql://u:p@ss@host/db: libpq takes "ss@host" for the host name.
        raise ConfigError(
            name,
            "has more than one @ before the host; write an @ in the user or password as %40"
            f" ({masked_url(value)})",
        )
    for host_port in hosts.split(","):
        if host_port.startswith("["):  # [IPv6]:port
            _, _, rest = host_port.partition("]")
            port = rest.removeprefix(":")
        else:
            port = host_port.partition(":")[2]
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(
                name, f"has port {port!r}, not a number 1-65535 ({masked_url(value)})"
            )


def _flag(src: tuple[str, str] | None) -> bool:
    if src is None:
        return False
    name, value = src
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be 1 or 0, not {value!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address kied binds or a peer's address) is this machine only."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a host name other than localhost may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_exposure(settings: Settings, addresses: Sequence[str]) -> str | None:
    """Refuse to listen beyond this machine with the API or the callbacks unauthenticated.

    Args:
        settings: the validated settings.
        addresses: the addresses kied listens on (``settings.host``, or those of the
            sockets systemd passed; ``""`` when they cannot be known).

    Returns:
        A warning to log when kied runs open on loopback or on purpose; else None.

    Raises:
        ConfigError: kied would listen on a non-loopback address without an API token,
            or without callback authentication, and ``KIED_ALLOW_OPEN`` is not set.
    """
    missing: list[tuple[str, str]] = []
    if settings.api_token is None:
        missing.append(("KIED_API_TOKEN", "without an API token"))
    if settings.callback_token is None and settings.webhook_hmac_key is None:
        missing.append(
            (
                "KIED_CALLBACK_TOKEN",
                "without callback authentication (KIED_CALLBACK_TOKEN or KIE_WEBHOOK_HMAC_KEY)",
            )
        )
    if not missing:
        return None
    exposed = [a for a in addresses if not is_loopback(a)]
    what = " and ".join(problem for _, problem in missing)
    if settings.allow_open:
        return f"running open on purpose (KIED_ALLOW_OPEN=1): {what}"
    if exposed:
        name = missing[0][0]
        where = exposed[0] or "the sockets systemd passed"
        raise ConfigError(
            name,
            f"listening on {where} {what}; set {'them' if len(missing) > 1 else 'it'},"
            " or KIED_ALLOW_OPEN=1 to run open on purpose",
        )
    return f"running open on loopback, for development: {what}"


def _lock(
    src: tuple[str, str] | None,
    store: SqliteStoreSettings | PostgresStoreSettings,
    *,
    render: bool,
) -> FileLockSettings | PgLockSettings | NoLockSettings:
    on_postgres = isinstance(store, PostgresStoreSettings)
    value = ("postgres" if on_postgres else "file") if src is None else src[1]
    name = "KIED_LOCK" if src is None else src[0]
    if value == "none":
        return NoLockSettings()
    if value == "postgres":
        if not on_postgres:
            raise ConfigError(
                name,
                "the postgres lock needs a postgresql:// KIED_DATABASE_URL; set KIED_LOCK=file",
            )
        return PgLockSettings()
    if value != "file" and not value.startswith("file:"):
        raise ConfigError(name, f"must be postgres, file, file:PATH or none, not {value!r}")
    if on_postgres:
        raise ConfigError(
            name,
            "a file lock cannot elect one leader among instances that share a PostgreSQL"
            " database; set KIED_LOCK=postgres",
        )
    if render:
        raise ConfigError(
            name,
            "on Render (RENDER is set) instances share no disk, so a file lock cannot elect"
            " one leader; use a postgresql:// KIED_DATABASE_URL with KIED_LOCK=postgres,"
            " or set KIED_LOCK=none for a single instance",
        )
    if value == "file":
        assert isinstance(store, SqliteStoreSettings)
        return FileLockSettings(path=store.path.with_name(store.path.name + ".lock"))
    path = value[len("file:") :]
    if not path or path.endswith("/"):
        raise ConfigError(name, f"file:PATH needs a file path, not {value!r}")
    return FileLockSettings(path=Path(os.path.abspath(path)))
