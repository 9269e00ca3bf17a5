"""The ``kied`` command: serve, inspect-callback, simulate, submit, status, jobs, deliveries,
redeliver, demo, prune.

This is the entry point: the only place that reads ``os.environ``, configures logging
and installs signal handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio

from kied import __version__
from kied.errors import ConfigError, StoreError
from kied.settings import Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kied.settings import LogFormat
    from kied.store import Prunable, PruneKind

__all__ = ["configure_logging", "main"]

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
    print(f"kied: unknown command {command!r}\n\n{_COMMANDS}", file=sys.stderr)
    return 2


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Lines on stderr: plain text, or one JSON object per line for log shippers.

    Under systemd the journal adds its own timestamps, so text lines carry none.
    """
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler], force=True)
    else:
        under_journal = "JOURNAL_STREAM" in os.environ
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if under_journal
            else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    # httpx logs every request at INFO: status queries would drown the daemon's own lines.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


# Every attribute a plain record has; anything else on a record came from ``extra=``.
_PLAIN_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
_RECORD_ATTRIBUTES = frozenset(vars(_PLAIN_RECORD)) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the ``extra`` fields."""

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
        return json.dumps(entry, ensure_ascii=False, default=str)


def _serve(argv: Sequence[str]) -> int:
    try:
        settings = load_settings(os.environ, argv)
    except ConfigError as exc:
        print(f"kied: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    failure: OSError | None = None
    try:
        trio.run(_serve_async, settings)
    except* OSError as group:
        failure = _first_leaf(group)
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


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, OSError)
    return exc


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
    return rows


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


def _kept(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    return f"{seconds / 60:g} min"
