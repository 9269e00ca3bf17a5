"""``kied submit``, ``kied status``, ``kied jobs`` and ``kied demo``: the jobs API from a shell.

The first three talk to a running daemon over its ``/v1`` API (``--url``/``KIED_URL``,
``--token``/``KIED_API_TOKEN``). Every failure is one line on stderr, and the exit status
says which kind it was:

====  =====================================================================================
0     the job was created or found (with ``--wait``: it succeeded)
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
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import quote

import httpx

from kied._apierror import api_error_line
from kied._apierror import one_line as _one_line
from kied.jobs import MAX_WAIT_S

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
    """Run ``kied submit``, ``kied status`` or ``kied jobs``; returns the exit status.

    Args:
        command: ``submit``, ``status`` or ``jobs``.
        argv: the arguments after the command word.
        environ: the process environment, for ``KIED_URL`` and ``KIED_API_TOKEN``.
    """
    commands = {"submit": _submit, "status": _status, "jobs": _jobs}
    try:
        return commands[command](_expand_bare_wait(argv), environ)
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


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _age(created_at: object, now: float) -> str:
    if not isinstance(created_at, str):
        return "-"
    try:
        created = datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "-"
    seconds = max(0.0, now - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


# ============================================================================================
# Flags


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=_CLIENT_EPILOG,
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
