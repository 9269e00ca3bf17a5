"""``kied submit``, ``status``, ``jobs``, ``deliveries``, ``redeliver``, ``demo``: kied from a shell.

All but ``demo`` talk to a running daemon over its ``/v1`` API (``--url``/``KIED_URL``,
``--token``/``KIED_API_TOKEN``); ``deliveries`` and ``redeliver`` show and send again the
webhooks the daemon sends. Every failure is one line on stderr, and the exit status says
which kind it was:

====  =====================================================================================
0     the job was created or found (with ``--wait``: it succeeded); deliveries were listed,
      or sent again
1     the job failed, timed out or was cancelled
2     bad usage, or the daemon refused the request (4xx); the line names the field
3     the daemon cannot be reached, or answered with a server error or not like kied
4     ``--wait`` ran out while the job was still running
130   interrupted (Ctrl-C) while waiting; the job goes on in the daemon
====  =====================================================================================

``kied demo`` runs a simulator and a daemon in this process; it lives in :mod:`kied._demo`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import quote

import httpx

from kied._apierror import api_error_line
from kied._apierror import one_line as _one_line
from kied._times import parse_instant
from kied.api import MAX_WAIT_S

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["api_error_line", "demo", "main"]

_DEFAULT_URL: Final = "http://127.0.0.1:8080"
#: ``--wait`` with no number waits this long in all.
_DEFAULT_WAIT_S: Final = 900.0
#: Every request but a long poll must be answered within this.
_REQUEST_S: Final = 10.0

_EXIT_OK: Final = 0
_EXIT_JOB_ENDED_BADLY: Final = 1
_EXIT_BAD_USAGE: Final = 2
_EXIT_UNREACHABLE: Final = 3
_EXIT_STILL_RUNNING: Final = 4
_EXIT_INTERRUPTED: Final = 130

_CLIENT_EPILOG = """\
environment (flags win over the environment):
  KIED_URL         the daemon's URL; default http://127.0.0.1:8080
  KIED_API_TOKEN   bearer token the daemon's /v1 API requires, if it requires one

exit status: 0 created/found (with --wait: succeeded), 1 failed, timed out or cancelled,
2 bad usage or refused by the daemon (4xx), 3 daemon unreachable or broken (5xx),
4 --wait ran out while the job was still running, 130 interrupted while waiting
"""

_WEBHOOKS_EPILOG = """\
environment (flags win over the environment):
  KIED_URL         the daemon's URL; default http://127.0.0.1:8080
  KIED_API_TOKEN   bearer token the daemon's /v1 API requires, if it requires one

times (T): ISO 8601 (2026-01-31T09:00:00Z; UTC unless it names an offset), epoch
seconds (1769850000), or a time ago: -30m, -2h, -1d (also s)

exit status: 0 done, 2 bad usage or refused by the daemon (4xx),
3 daemon unreachable or broken (5xx)
"""
#: ``-2h``: a time ago, for ``--since``
_AGO = re.compile(r"-?(\d+(?:\.\d*)?|\.\d+)([smhd])")
_UNIT_S: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: how much of an error a table cell shows
_CELL_CHARS: Final = 60


class _ExitError(Exception):
    """Stop the command with ``status``, after printing ``line`` on stderr."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status = status
        self.line = line


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _ExitError(_EXIT_BAD_USAGE, f"{self.prog}: {message} (see {self.prog} --help)")


def main(command: str, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run ``kied submit``, ``status``, ``jobs``, ``deliveries`` or ``redeliver``; the exit status.

    Args:
        command: ``submit``, ``status``, ``jobs``, ``deliveries`` or ``redeliver``.
        argv: the arguments after the command word.
        environ: the process environment, for ``KIED_URL`` and ``KIED_API_TOKEN``.
    """
    commands = {
        "submit": _submit,
        "status": _status,
        "jobs": _jobs,
        "deliveries": _deliveries,
        "redeliver": _redeliver,
    }
    try:
        return commands[command](_attach_since(_expand_bare_wait(argv)), environ)
    except _ExitError as exc:
        print(exc.line, file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("kied: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else _EXIT_OK


def demo(argv: Sequence[str]) -> int:
    """Run ``kied demo``; returns the exit status (see :func:`kied._demo.main`)."""
    from kied._demo import main as run_demo

    return run_demo(argv)


# ============================================================================================
# The commands


def _submit(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = _parser(
        "kied submit",
        "Submit a job to the daemon and print it as JSON.\n\n"
        "A Market job names its --model, a job of another family its --family. With\n"
        "--task-id, kied tracks a task the application created itself (no --input).",
    )
    parser.add_argument("--model", help="the Market model, e.g. google/nano-banana")
    parser.add_argument("--family", help="the KIE family (market, veo, runway, suno, ...)")
    parser.add_argument(
        "--input",
        metavar="JSON|@FILE|@-",
        help="the generation request, a JSON object; @FILE reads a file, @- standard input",
    )
    parser.add_argument(
        "--task-id", metavar="TASK", help="track this existing KIE task instead (with --family)"
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=_seconds, help="the job's deadline (daemon default)"
    )
    parser.add_argument(
        "--idempotency-key", metavar="KEY", help="submitting the same key again returns that job"
    )
    parser.add_argument(
        "--metadata", metavar="JSON|@FILE", help="a JSON object kept with the job, for you"
    )
    _add_wait(parser)
    args = parser.parse_args(list(argv))
    if args.model is None and args.family is None:
        raise _ExitError(_EXIT_BAD_USAGE, "kied submit: needs --model (Market) or --family")
    if args.task_id is not None and args.input is not None:
        raise _ExitError(
            _EXIT_BAD_USAGE, "kied submit: --input: a tracked task (--task-id) takes no input"
        )
    if args.task_id is None and args.input is None:
        raise _ExitError(_EXIT_BAD_USAGE, "kied submit: --input: the generation request is needed")

    body: dict[str, Any] = {}
    for key, value in (
        ("model", args.model),
        ("family", args.family),
        ("task_id", args.task_id),
        ("timeout_s", args.timeout),
        ("idempotency_key", args.idempotency_key),
    ):
        if value is not None:
            body[key] = value
    if args.input is not None:
        body["input"] = _json_object("--input", args.input)
    if args.metadata is not None:
        body["metadata"] = _json_object("--metadata", args.metadata)

    with _Api.open(args, environ) as api:
        job = api.call("POST", "/v1/jobs", json=body)
        if args.wait is not None:
            job = _wait(api, job, args.wait)
    return _print_job(job, waited=args.wait is not None)


def _status(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = _parser("kied status", "Print a job as JSON, or its callback trail.")
    parser.add_argument("job", metavar="JOB", help="the job's id")
    _add_wait(parser)
    parser.add_argument(
        "--callbacks",
        action="store_true",
        help="print the callbacks KIE sent about the job instead, newest first, as a table: "
        "when, what they said, and what kied made of them (the exit status still follows "
        "the job)",
    )
    parser.add_argument(
        "--json", action="store_true", help="with --callbacks: print the trail as JSON"
    )
    args = parser.parse_args(list(argv))
    if args.json and not args.callbacks:
        raise _ExitError(_EXIT_BAD_USAGE, "kied status: --json goes with --callbacks")
    path = f"/v1/jobs/{_path_segment(args.job)}"
    with _Api.open(args, environ) as api:
        job = api.call("GET", path)
        if args.wait is not None:
            job = _wait(api, job, args.wait)
        if not args.callbacks:
            return _print_job(job, waited=args.wait is not None)
        trail = api.call("GET", f"{path}/callbacks", params=httpx.QueryParams({"limit": 1000}))
    found = trail.get("callbacks")
    if not isinstance(found, list):
        raise _ExitError(_EXIT_UNREACHABLE, f"kied: {api.url} did not answer like kied")
    if args.json:
        _emit(json.dumps(found, ensure_ascii=False, indent=2))
    elif found:
        _emit(_callbacks_table(found))
    else:
        _emit(f"no callback has come for job {job.get('id')}")
    return _job_exit_status(job, waited=args.wait is not None)


def _jobs(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = _parser("kied jobs", "List jobs, newest first, as a table.")
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help="only jobs in this state (submitting, pending, succeeded, failed, timed_out, "
        "cancelled); repeatable, or comma-separated",
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="at most N jobs (daemon default 100)"
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON instead")
    args = parser.parse_args(list(argv))
    states = [s.strip() for value in args.state for s in value.split(",") if s.strip()]
    query = httpx.QueryParams({"state": states})
    if args.limit is not None:
        query = query.set("limit", args.limit)
    with _Api.open(args, environ) as api:
        found = api.call("GET", "/v1/jobs", params=query).get("jobs")
    if not isinstance(found, list):
        raise _ExitError(_EXIT_UNREACHABLE, f"kied: {api.url} did not answer like kied")
    if args.json:
        _emit(json.dumps(found, ensure_ascii=False, indent=2))
    else:
        _emit(_jobs_table(found, now=time.time()))
    return _EXIT_OK


def _deliveries(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = _parser(
        "kied deliveries",
        "List webhook deliveries, newest first, as a table, then the endpoints disabled\n"
        "after a 410. An endpoint's query, which may hold a secret, is shown as ?….",
        epilog=_WEBHOOKS_EPILOG,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--failed", action="store_true", help="only failed deliveries (dead letters)"
    )
    which.add_argument(
        "--state", metavar="STATE", help="only deliveries in this state: pending, delivered, failed"
    )
    parser.add_argument("--event", metavar="EVENT_ID", help="only the deliveries of this event")
    parser.add_argument(
        "--since", metavar="T", type=_instant, help="only deliveries made at or after T"
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="at most N deliveries (daemon default 100)"
    )
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    args = parser.parse_args(list(argv))
    query = httpx.QueryParams()
    state = "failed" if args.failed else args.state
    for key, value in (
        ("state", state),
        ("event_id", args.event),
        ("since", None if args.since is None else f"{args.since:.3f}"),
        ("limit", args.limit),
    ):
        if value is not None:
            query = query.set(key, value)
    with _Api.open(args, environ) as api:
        answer = api.call("GET", "/v1/deliveries", params=query)
    found, disabled = answer.get("deliveries"), answer.get("disabled_endpoints")
    if not isinstance(found, list) or not isinstance(disabled, dict):
        raise _ExitError(_EXIT_UNREACHABLE, f"kied: {api.url} did not answer like kied")
    if args.json:
        _emit(json.dumps(answer, ensure_ascii=False, indent=2))
        return _EXIT_OK
    parts = [_deliveries_table(found, now=time.time()) if found else "no delivery"]
    if disabled:
        parts.append("\ndisabled endpoints (kied redeliver enables an endpoint again):")
        parts.append(_table([(f"  {url}", _one_line(str(why))) for url, why in disabled.items()]))
    _emit("\n".join(parts))
    return _EXIT_OK


def _redeliver(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    parser = _parser(
        "kied redeliver",
        "Send webhook deliveries again, from their first attempt: every delivery of one\n"
        "event (kied redeliver EVENT_ID), or every failed one made since a time\n"
        "(kied redeliver --failed --since T). Their endpoints are enabled again.",
        epilog=_WEBHOOKS_EPILOG,
    )
    parser.add_argument(
        "event", nargs="?", metavar="EVENT_ID", help="the event (evt_…) to send again"
    )
    parser.add_argument(
        "--failed", action="store_true", help="the failed deliveries (dead letters) instead"
    )
    parser.add_argument(
        "--since",
        metavar="T",
        type=_instant,
        help="with --failed: those made at or after T (--since 0: every one)",
    )
    args = parser.parse_args(list(argv))
    body: dict[str, Any]
    if args.event is not None:
        if args.failed or args.since is not None:
            raise _ExitError(
                _EXIT_BAD_USAGE, "kied redeliver: give EVENT_ID or --failed --since T, not both"
            )
        body = {"event_id": args.event}
        what, which = "deliver", f"of event {args.event}"
    elif not args.failed:
        raise _ExitError(_EXIT_BAD_USAGE, "kied redeliver: give EVENT_ID, or --failed --since T")
    elif args.since is None:
        raise _ExitError(
            _EXIT_BAD_USAGE,
            "kied redeliver: --failed needs --since T (--since 0 for every failed delivery)",
        )
    else:
        body = {"failed_since": args.since}
        what, which = "failed deliver", f"made since {_iso(args.since)}"
    with _Api.open(args, environ) as api:
        count = api.call("POST", "/v1/deliveries/redeliver", json=body).get("redelivered")
    if not isinstance(count, int) or isinstance(count, bool):
        raise _ExitError(_EXIT_UNREACHABLE, f"kied: {api.url} did not answer like kied")
    if count == 0:
        _emit(f"nothing sent again: no {what}y {which}")
    else:
        _emit(f"sent again: {count} {what}{'y' if count == 1 else 'ies'} {which}")
    return _EXIT_OK


def _emit(text: str) -> None:
    """Print ``text`` on stdout; a reader that went away (``| head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# ============================================================================================
# Talking to the daemon


class _Api:
    """A short-lived sync client for the daemon's ``/v1`` API that turns failures into exits."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # trust_env=False: the daemon is reached directly, and a ~/.netrc entry must not
        # replace the bearer token.
        self._client = httpx.Client(
            base_url=url, headers=headers, timeout=_REQUEST_S, trust_env=False
        )

    @classmethod
    def open(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> _Api:
        url = (args.url or environ.get("KIED_URL", "").strip() or _DEFAULT_URL).rstrip("/")
        source = "--url" if args.url else ("KIED_URL" if environ.get("KIED_URL") else "URL")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise _ExitError(_EXIT_BAD_USAGE, f"kied: {source}: not a URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise _ExitError(
                _EXIT_BAD_USAGE, f"kied: {source}: must be an http:// or https:// URL, not {url!r}"
            )
        token = args.token if args.token is not None else environ.get("KIED_API_TOKEN", "").strip()
        return cls(url, token or None)

    def __enter__(self) -> _Api:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: httpx.QueryParams | None = None,
        read_s: float = _REQUEST_S,
    ) -> dict[str, Any]:
        """One request; the answer's JSON object, or an :class:`_ExitError`."""
        timeout = httpx.Timeout(_REQUEST_S, read=read_s)
        try:
            response = self._client.request(method, path, json=json, params=params, timeout=timeout)
        except httpx.RequestError as exc:
            reason = str(exc).strip() or type(exc).__name__
            if isinstance(exc, httpx.TimeoutException):
                reason = f"no answer in time ({reason})"
            raise _ExitError(
                _EXIT_UNREACHABLE, f"kied: cannot reach {self.url}: {_one_line(reason)}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        status = response.status_code
        if 400 <= status < 500:
            raise _ExitError(
                _EXIT_BAD_USAGE, f"kied: {api_error_line(status, body, response.text)}"
            )
        if status >= 500:
            raise _ExitError(
                _EXIT_UNREACHABLE,
                f"kied: {self.url} failed: {api_error_line(status, body, response.text)}",
            )
        if not isinstance(body, dict):
            raise _ExitError(
                _EXIT_UNREACHABLE,
                f"kied: {self.url} did not answer like kied (HTTP {status}, "
                f"{response.headers.get('content-type', 'no content type')})",
            )
        return body


def _wait(api: _Api, job: dict[str, Any], total_s: float) -> dict[str, Any]:
    """Long-poll until the job ends or ``total_s`` has passed, one ``?wait=`` at a time."""
    job_id = str(job.get("id"))
    if not job.get("terminal") and sys.stderr.isatty():
        print(
            f"kied: waiting for job {job_id} ({job.get('state')}), up to {total_s:g} s",
            file=sys.stderr,
        )
    deadline = time.monotonic() + total_s
    try:
        while not job.get("terminal"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait_s = round(min(remaining, MAX_WAIT_S), 3)
            job = api.call(
                "GET",
                f"/v1/jobs/{_path_segment(job_id)}",
                params=httpx.QueryParams({"wait": f"{wait_s:g}"}),
                read_s=wait_s + _REQUEST_S,
            )
    except KeyboardInterrupt:
        raise _ExitError(
            _EXIT_INTERRUPTED,
            f"kied: stopped waiting; job {job_id} goes on (kied status {job_id} --wait)",
        ) from None
    return job


def _print_job(job: dict[str, Any], *, waited: bool) -> int:
    _emit(json.dumps(job, ensure_ascii=False, indent=2))
    return _job_exit_status(job, waited=waited)


def _job_exit_status(job: dict[str, Any], *, waited: bool) -> int:
    state = job.get("state")
    if state == "succeeded":
        return _EXIT_OK
    if job.get("terminal"):
        return _EXIT_JOB_ENDED_BADLY
    if waited:
        print(f"kied: job {job.get('id')} is still {state}", file=sys.stderr)
        return _EXIT_STILL_RUNNING
    return _EXIT_OK


# ============================================================================================
# The jobs table


def _jobs_table(jobs: Sequence[Mapping[str, Any]], *, now: float) -> str:
    """``kied jobs``'s table: id, state, family/model, task id, ended_by, age."""
    header = ("ID", "STATE", "FAMILY/MODEL", "TASK", "ENDED BY", "AGE")
    rows: list[tuple[str, ...]] = [header]
    for job in jobs:
        family = str(job.get("family") or "-")
        model = job.get("model")
        rows.append(
            (
                str(job.get("id") or "-"),
                str(job.get("state") or "-") + (" (late)" if job.get("late") else ""),
                f"{family}/{model}" if model else family,
                str(job.get("task_id") or "-"),
                str(job.get("ended_by") or "-"),
                _age(job.get("created_at"), now),
            )
        )
    return _table(rows)


def _callbacks_table(callbacks: Sequence[Mapping[str, Any]]) -> str:
    """``kied status --callbacks``'s table: when, outcome, effect, auth, task, size, problem."""
    header = ("RECEIVED", "OUTCOME", "EFFECT", "AUTH", "TASK", "FOUND BY", "SIZE", "PROBLEM")
    rows: list[tuple[str, ...]] = [header]
    for cb in callbacks:
        rows.append(
            (
                str(cb.get("received_at") or "-"),
                str(cb.get("outcome") or "-"),
                str(cb.get("effect") or "-"),
                _one_line(str(cb.get("auth") or "-")),
                str(cb.get("task_id") or "-"),
                str(cb.get("found_by") or "-"),
                str(cb.get("body_size", "-")),
                _one_line(str(cb.get("problem") or "-")),
            )
        )
    return _table(rows)


def _deliveries_table(deliveries: Sequence[Mapping[str, Any]], *, now: float) -> str:
    """``kied deliveries``'s table: event, type, endpoint, state, attempts, last, next."""
    header = ("EVENT", "TYPE", "ENDPOINT", "STATE", "ATTEMPTS", "LAST", "NEXT ATTEMPT")
    rows: list[tuple[str, ...]] = [header]
    for d in deliveries:
        rows.append(
            (
                str(d.get("event_id") or "-"),
                str(d.get("type") or "-"),
                str(d.get("endpoint") or "-"),
                str(d.get("state") or "-"),
                str(d.get("attempts", "-")),
                _last_outcome(d),
                _until(d.get("next_attempt_at"), now) if d.get("state") == "pending" else "-",
            )
        )
    return _table(rows)


def _last_outcome(delivery: Mapping[str, Any]) -> str:
    """What the endpoint last said: its error (``HTTP 500``, a network error) or status."""
    error, status = delivery.get("last_error"), delivery.get("last_status")
    if error:
        text = _one_line(str(error))
        return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…"
    return "-" if status is None else str(status)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _age(created_at: object, now: float) -> str:
    created = _epoch(created_at)
    return "-" if created is None else _span(now - created)


def _until(at: object, now: float) -> str:
    when = _epoch(at)
    if when is None:
        return "-"
    return "now" if when <= now else f"in {_span(when - now)}"


def _epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ============================================================================================
# Flags


def _parser(
    prog: str, description: str, *, epilog: str = _CLIENT_EPILOG
) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--url", help=f"the daemon's URL (KIED_URL; default {_DEFAULT_URL})")
    parser.add_argument("--token", help="the daemon's API token (KIED_API_TOKEN)")
    return parser


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        nargs="?",
        const=_DEFAULT_WAIT_S,
        type=_seconds_or_zero,
        metavar="SECONDS",
        help=f"wait until the job ends, at most SECONDS in all (default {_DEFAULT_WAIT_S:g})",
    )


def _expand_bare_wait(argv: Sequence[str]) -> list[str]:
    """``--wait JOB`` means "wait the default", not "wait JOB seconds"."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--wait" and i + 1 < len(out) and not _is_number(out[i + 1]):
            out[i] = f"--wait={_DEFAULT_WAIT_S:g}"
    return out


def _attach_since(argv: Sequence[str]) -> list[str]:
    """``--since -2h`` means ``--since=-2h``: argparse takes ``-2h`` for a flag otherwise."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--since":
            value = next(args, None)
            out.append(arg if value is None else f"--since={value}")
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text!r}")
    return value


def _seconds_or_zero(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, not {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not {text!r}")
    return value


def _instant(text: str) -> float:
    """Epoch seconds from ISO 8601, epoch seconds, or a time ago (``-2h``)."""
    if m := _AGO.fullmatch(text.strip()):
        return time.time() - float(m[1]) * _UNIT_S[m[2]]
    try:
        return parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or -30m, -2h, -1d), not {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text!r}")
    return value


def _json_object(flag: str, value: str) -> dict[str, Any]:
    """A JSON object from ``JSON``, ``@FILE`` or ``@-`` (standard input)."""
    source = value
    if value.startswith("@"):
        path = value[1:]
        try:
            if path == "-":
                source = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
        except OSError as exc:
            raise _ExitError(
                _EXIT_BAD_USAGE, f"kied submit: {flag}: cannot read {path}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise _ExitError(
                _EXIT_BAD_USAGE, f"kied submit: {flag}: {path} is not UTF-8 text"
            ) from None
    try:
        parsed = json.loads(source)
    except json.JSONDecodeError as exc:
        raise _ExitError(_EXIT_BAD_USAGE, f"kied submit: {flag}: not valid JSON: {exc}") from None
    except RecursionError:
        raise _ExitError(_EXIT_BAD_USAGE, f"kied submit: {flag}: nested too deeply") from None
    if not isinstance(parsed, dict):
        raise _ExitError(
            _EXIT_BAD_USAGE,
            f"kied submit: {flag}: must be a JSON object, not {_json_kind(parsed)}",
        )
    return parsed


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _path_segment(text: str) -> str:
    return quote(text, safe="")
