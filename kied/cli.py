"""The ``kied`` command: serve, inspect-callback, simulate, submit, status, jobs, deliveries,
redeliver, demo, prune.

This is the entry point: the only place that reads ``os.environ``, configures logging
and installs signal handlers.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar, cast
from urllib.parse import quote, quote_plus, unquote, urlsplit

import trio

from kied import __version__
from kied.errors import ConfigError, StoreError, StoreMisconfiguredError
from kied.settings import (
    DirArchiveSettings,
    FileLockSettings,
    PostgresStoreSettings,
    S3ArchiveSettings,
    Settings,
    SqliteStoreSettings,
    check_exposure,
    load_settings,
    masked_url,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

    from kied.settings import LogFormat
    from kied.store import Prunable, PruneKind

__all__ = ["configure_logging", "main", "secrets_of"]

logger = logging.getLogger("kied")

_COMMANDS = """\
commands:
  serve             run the daemon (kied serve --help lists every setting)
  inspect-callback  show what kied makes of a callback body: kied inspect-callback FILE|-
  simulate          run a fake KIE API for development (kied simulate --help)
  submit            submit a job to a running daemon: kied submit --model M --input JSON [--wait]
  status            print a job: kied status JOB [--wait]
  jobs              list jobs as a table: kied jobs [--state S] [--limit N] [--json]
  deliveries        list webhook deliveries: kied deliveries [--failed|--state S] [--event ID]
                    [--since T] [--limit N] [--json]
  redeliver         send webhooks again: kied redeliver EVENT_ID, or --failed --since T
  demo              a simulator and a daemon in one process, N jobs, one table (kied demo --help)
  prune             delete now what the retention settings no longer keep, from the database
                    kied serve uses: kied prune [--dry-run] (kied prune --help)
  archive           archive again the result files of jobs whose archiving failed or whose
                    files are missing: kied archive --retry-failed (kied archive --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kied`` command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(f"usage: kied COMMAND [ARGS]\n\n{_COMMANDS}")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"kied {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        return _serve(rest)
    if command == "inspect-callback":
        return _inspect_callback(rest)
    if command == "simulate":
        from kied.kie.simulator import main as simulate

        return simulate(rest)
    if command in ("submit", "status", "jobs", "deliveries", "redeliver"):
        from kied.client_cli import main as client

        return client(command, rest, os.environ)
    if command == "demo":
        from kied.client_cli import demo

        return demo(rest)
    if command == "prune":
        return _prune(rest)
    if command == "archive":
        return _archive(rest)
    print(f"kied: unknown command {command!r}\n\n{_COMMANDS}", file=sys.stderr)
    return 2


def configure_logging(
    level: str, log_format: LogFormat = "text", *, secrets: Iterable[str] = ()
) -> None:
    """Lines on stderr: plain text, or one JSON object per line for log shippers.

    Under systemd the journal adds its own timestamps, so text lines carry none.

    Args:
        level: the least level logged.
        log_format: ``text`` or ``json``.
        secrets: values no line may show (tokens, keys, the database password); each is
            written ``***`` wherever it appears, at every level.

    A text line never holds a raw control character: a newline, ESC or the like in a
    message (a callback's ``?job=``, say) is written escaped (``\\n``, ``\\x1b``), so a
    message cannot forge a line of its own or drive the terminal; lines of a traceback
    after the first are indented. JSON lines are escaped by JSON itself.
    """
    redact = _Redactor(secrets)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter(redact))
    else:
        under_journal = "JOURNAL_STREAM" in os.environ
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if under_journal
            else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        handler.setFormatter(_TextFormatter(fmt, redact))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet = max(logging.WARNING, logging.getLevelName(level))
    # httpx logs every request at INFO: status queries would drown the daemon's own lines.
    # The HTTP/2 header codec (hpack, h2) and the HTTP/1 one (h11, httpcore) log headers
    # at DEBUG, bearer tokens among them: never below WARNING.
    for name in ("httpx", "httpcore", "hpack", "h2", "h11"):
        logging.getLogger(name).setLevel(quiet)


class _Redactor:
    """Writes ``***`` for each secret, as given and as it appears in a URL or JSON."""

    #: shorter values are not secrets worth the name, and would mask ordinary words
    _SHORTEST = 4

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if len(secret) < self._SHORTEST:
                continue
            forms.update(
                (secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1])
            )
        # Longest first, so that a secret inside another is not half-replaced.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub("***", text)


#: C0 controls, DEL, C1 controls and lone surrogates: none belongs in a log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\t"}


def _escape_control(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with each control character written as an escape (a tab stays a tab)."""

    def escaped(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        if char in _NAMED:
            return _NAMED[char]
        code = ord(char)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _CONTROL.sub(escaped, text)


class _TextFormatter(logging.Formatter):
    """One line per record, secrets hidden and control characters escaped."""

    def __init__(self, fmt: str, redact: _Redactor) -> None:
        super().__init__(fmt)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escape_control(self._redact(record.getMessage()))
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        blocks = []
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            # Indented: a line of a traceback never reads as a record of its own.
            text = _escape_control(self._redact(block), keep_newlines=True)
            line += "".join("\n  " + part for part in text.split("\n"))
        return line


# Every attribute a plain record has; anything else on a record came from ``extra=``.
_PLAIN_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
_RECORD_ATTRIBUTES = frozenset(vars(_PLAIN_RECORD)) | {"message", "asctime"}
#: What ``json.dumps(ensure_ascii=False)`` leaves raw: C1 controls and lone surrogates.
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\ud800-\udfff]")


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the ``extra`` fields."""

    def __init__(self, redact: _Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or _Redactor(())

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        line = self._redact(json.dumps(entry, ensure_ascii=False, default=str))
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret ``settings`` holds, as text: what no log line may show."""
    found = [
        settings.api_token,
        settings.callback_token,
        settings.kie_api_key,
        settings.metrics_token,
        settings.webhook_hmac_key.decode("utf-8", "replace") if settings.webhook_hmac_key else None,
    ]
    for key in settings.webhook_keys:
        encoded = base64.b64encode(key).decode()
        found += [encoded, "whsec_" + encoded]
    if isinstance(settings.store, PostgresStoreSettings):
        found += _database_passwords(settings.store.url)
    if isinstance(settings.archive, S3ArchiveSettings):
        found += [settings.archive.secret_access_key, settings.archive.session_token]
    return [secret for secret in found if secret]


def _database_passwords(url: str) -> list[str]:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    found = [password, unquote(password)] if password else []
    # A key=value connection string: password=SECRET or password='SECRET'.
    found += re.findall(r"\bpassword\s*=\s*'((?:[^'\\]|\\.)*)'", url)
    found += re.findall(r"\bpassword\s*=\s*([^\s']\S*)", url)
    return found


def _serve(argv: Sequence[str]) -> int:
    try:
        settings = load_settings(os.environ, argv)
        open_warning = check_exposure(settings, _listening_addresses(settings))
        _check_data_directories(settings)
    except ConfigError as exc:
        print(f"kied: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, secrets=secrets_of(settings))
    if open_warning is not None:
        logger.warning("[HTTP] %s", open_warning)
    failure: OSError | None = None
    misconfigured: StoreMisconfiguredError | None = None
    unavailable: ConfigError | None = None
    try:
        trio.run(_serve_async, settings)
    except* ConfigError as group:
        unavailable = _first_leaf(group)
    except* StoreMisconfiguredError as group:
        misconfigured = _first_leaf(group)
    except* OSError as group:
        failure = _first_leaf(group)
    if unavailable is not None:
        print(f"kied: {unavailable}", file=sys.stderr)
        return 2
    if misconfigured is not None:
        # Permanent: exit 2, which systemd does not restart (RestartPreventExitStatus=2).
        print(f"kied: {_database_problem(settings, misconfigured)}", file=sys.stderr)
        return 2
    if failure is not None:
        # One line for the user; the log above has the detail.
        where = (
            f"the socket systemd passed (LISTEN_FDS={settings.listen_fds})"
            if settings.listen_fds
            else f"{settings.host}:{settings.port}"
        )
        print(f"kied: cannot serve on {where}: {failure}", file=sys.stderr)
        return 1
    return 0


def _database_problem(settings: Settings, exc: StoreMisconfiguredError) -> str:
    """One line naming the database setting, with no password in it."""
    store = settings.store
    where = masked_url(store.url) if isinstance(store, PostgresStoreSettings) else str(store.path)
    text = f"KIED_DATABASE_URL: {where}: {exc}"
    for secret in secrets_of(settings):
        text = text.replace(secret, "***")
    return _escape_control(" ".join(text.split()))


def _listening_addresses(settings: Settings) -> list[str]:
    """The addresses kied will listen on; ``""`` for a passed socket it cannot read."""
    if not settings.listen_fds:
        return [settings.host]
    addresses = []
    for fd in range(3, 3 + settings.listen_fds):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            addresses.append("")
            continue
        try:
            name = sock.getsockname()
        except OSError:
            name = ""
        finally:
            sock.detach()  # the descriptor stays open, for the server
        if sock.family == socket.AF_UNIX:
            addresses.append("localhost")  # a Unix socket is reached from this machine only
        elif isinstance(name, tuple):
            addresses.append(str(name[0]))
        else:
            addresses.append("")
    return addresses


def _check_data_directories(settings: Settings) -> None:
    """Refuse a SQLite file, or a lock file, that kied could never write.

    Raises:
        ConfigError: the directory is a file, cannot be created, or cannot be written.
    """
    store = settings.store
    if isinstance(store, SqliteStoreSettings):
        _check_writable(store.path, "KIED_DATABASE_URL")
    if isinstance(settings.lock, FileLockSettings):
        _check_writable(settings.lock.path, "KIED_LOCK")
    if isinstance(settings.archive, DirArchiveSettings):
        # A file in the directory: the directory itself is made and probed.
        _check_writable(settings.archive.path / ".probe", "KIED_ARCHIVE")


def _check_writable(path: Path, setting: str) -> None:
    directory = path.parent
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(setting, f"{path}: {parent} is a file, not a directory")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A file made and removed: the one test that holds for root, read-only mounts and
        # file systems that refuse new files alike.
        fd, probe = tempfile.mkstemp(prefix=".kied-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            setting, f"{path}: cannot write in {directory}: {exc.strerror or exc}"
        ) from None
    try:
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        raise ConfigError(setting, f"{path}: cannot write it: {exc.strerror or exc}") from None


async def _serve_async(settings: Settings) -> None:
    from kied.daemon import run

    stop = trio.Event()
    # Signals are caught before anything else starts: without this, SIGTERM kills the
    # process with no cleanup and SIGINT can be swallowed inside a request handler.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    logger.info("[HTTP] %s received: stopping", signal.Signals(signum).name)
                    stop.set()

            nursery.start_soon(watch_signals)
            await run(settings, stop=stop)
            nursery.cancel_scope.cancel()


_E = TypeVar("_E", bound=BaseException)


def _first_leaf(group: BaseExceptionGroup[_E]) -> _E:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return cast("_E", exc)


def _inspect_callback(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kied inspect-callback",
        description="Print, as one JSON object, what kied makes of a callback body.",
    )
    parser.add_argument("file", help="a file with the body, or - for standard input")
    parser.add_argument(
        "--query", default="", help="the callback URL's query string, e.g. 'taskId=abc'"
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header; repeatable",
    )
    args = parser.parse_args(list(argv))
    try:
        if args.file == "-":
            body = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                body = f.read()
    except OSError as exc:
        print(f"kied inspect-callback: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    from urllib.parse import parse_qsl

    from kied.core.callbacks import parse_callback, result_to_json

    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(
                f"kied inspect-callback: --header wants NAME:VALUE, not {item!r}", file=sys.stderr
            )
            return 2
        headers[name.strip().lower()] = value.strip()
    parsed = parse_callback(
        body,
        query=dict(parse_qsl(args.query, keep_blank_values=True)),
        headers=headers,
        content_type=headers.get("content-type"),
    )
    print(json.dumps(result_to_json(parsed), ensure_ascii=False, indent=2))
    return 0


def _prune(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kied prune",
        description=(
            "Delete now, in small batches, what the retention settings no longer keep:"
            " ended jobs and webhook deliveries (KIED_JOB_RETENTION_DAYS, default 30),"
            " callbacks (KIED_INBOX_RETENTION_DAYS, default 14) and events"
            " (KIED_EVENT_RETENTION_DAYS, default 7), from the database kied serve uses"
            " (KIED_DATABASE_URL). The leader does the same every 10 minutes."
        ),
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="only count what would be deleted now"
    )
    parser.add_argument("--database", help="database URL or SQLite path (KIED_DATABASE_URL)")
    args = parser.parse_args(list(argv))
    try:
        settings = load_settings(
            os.environ, [] if args.database is None else ["--database", args.database]
        )
    except ConfigError as exc:
        print(f"kied: {exc}", file=sys.stderr)
        return 2
    configure_logging("WARNING", settings.log_format)
    try:
        rows = trio.run(_prune_async, settings, args.dry_run)
    except ConfigError as exc:
        print(f"kied: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"kied prune: {exc}", file=sys.stderr)
        return 1
    from kied.core.views import iso

    table = [("kind", "kept", "would delete" if args.dry_run else "deleted", "oldest")]
    for kind, kept_s, found, deleted in rows:
        if kept_s is None or found is None:
            table.append((kind.value, "forever", "-", "-"))
            continue
        count = found.count if deleted is None else deleted
        table.append((kind.value, _kept(kept_s), str(count), iso(found.oldest) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


async def _prune_async(
    settings: Settings, dry_run: bool
) -> list[tuple[PruneKind, float | None, Prunable | None, int | None]]:
    """For each kind: how long it is kept, what was prunable, and how many were deleted
    (None in a dry run)."""
    import time

    from kied.pruner import ORDER, Retention, prune_kind
    from kied.store import open_store

    retention = Retention.of(settings)
    now = time.time()
    rows: list[tuple[PruneKind, float | None, Prunable | None, int | None]] = []
    async with open_store(settings.store, cleanup_s=settings.cleanup_s) as store:
        for kind in ORDER:
            kept_s = retention.kept_s(kind)
            if kept_s is None:
                rows.append((kind, None, None, None))
                continue
            before = now - kept_s
            found = await store.count_prunable(kind, before=before)
            deleted = None if dry_run else await prune_kind(store, kind, before=before)
            rows.append((kind, kept_s, found, deleted))
        if not dry_run and settings.archive is not None:
            # The deleted jobs' kept files go with them.
            from kied.archive import open_archive
            from kied.archiver import empty_trash

            async with open_archive(settings.archive) as archive:
                assert archive is not None
                await empty_trash(store, archive, timeout_s=30.0)
    return rows


def _archive(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kied archive",
        description=(
            "Mark for archiving again the succeeded jobs whose result files kied gave up on,"
            " and those whose kept files are missing from the archive (KIED_ARCHIVE). The"
            " leader of a running kied picks them up within 30 s; one started later does"
            " at once."
        ),
    )
    parser.add_argument(
        "--retry-failed", action="store_true", required=True, help="archive those jobs again"
    )
    parser.add_argument("--database", help="database URL or SQLite path (KIED_DATABASE_URL)")
    parser.add_argument("--archive", help="dir:PATH, s3://BUCKET/PREFIX or none (KIED_ARCHIVE)")
    args = parser.parse_args(list(argv))
    flags = [] if args.database is None else ["--database", args.database]
    flags += [] if args.archive is None else ["--archive", args.archive]
    try:
        settings = load_settings(os.environ, flags)
        if settings.archive is None:
            raise ConfigError("KIED_ARCHIVE", "archiving is off (none): there is nothing to retry")
        configure_logging("WARNING", settings.log_format, secrets=secrets_of(settings))
        failed, missing = trio.run(_archive_async, settings)
    except ConfigError as exc:
        print(f"kied: {exc}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:
        print(f"kied archive: {exc}", file=sys.stderr)
        return 1
    print(f"failed: {len(failed)} job(s) marked to archive again")
    for job_id in failed:
        print(f"  {job_id}")
    print(f"files missing: {len(missing)} job(s) marked to archive again")
    for job_id in missing:
        print(f"  {job_id}")
    return 0


async def _archive_async(settings: Settings) -> tuple[list[str], list[str]]:
    """Mark failed jobs, and archived jobs with a missing file, pending; their ids."""
    import time

    from kied.archive import open_archive
    from kied.core.jobs import ArchiveState
    from kied.store import open_store

    now = time.time()
    async with (
        open_archive(settings.archive) as archive,
        open_store(settings.store, cleanup_s=settings.cleanup_s) as store,
    ):
        assert archive is not None
        failed = await store.retry_archives(None, now=now)
        lacking = []
        for job in await store.list_jobs(states=["succeeded"], limit=1_000_000):
            if job.archive_state is not ArchiveState.ARCHIVED:
                continue
            for kept in job.files:
                with trio.fail_after(30):
                    present = await archive.exists(kept.key)
                if not present:
                    lacking.append(job.id)
                    break
        missing = await store.retry_archives(lacking, now=now) if lacking else []
    return list(failed), list(missing)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


def _kept(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    return f"{seconds / 60:g} min"
