"""``kied simulate``'s configuration: one frozen object, and the command line that builds it."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

from kied._flags import FlagParser, parse_duration, parse_integer, parse_number
from kied.errors import ConfigError
from kied.kie._sim_faults import MalformedKind, StatusErrorKind
from kied.kie._sim_files import MAX_FILE_SIZE

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["SimulatorConfig", "parse_byte_range", "parse_simulator_args"]

SECONDS = 1.0

_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


# ============================================================================================
# Configuration

#: The command-line flag behind each configuration field, for error messages.
_FLAG: Final[Mapping[str, str]] = {
    "host": "--host",
    "port": "--port",
    "duration_s": "--duration",
    "fail_rate": "--fail-rate",
    "drop_callbacks": "--drop-callbacks",
    "duplicate_callbacks": "--duplicate-callbacks",
    "late_callbacks": "--late-callbacks",
    "late_delay_s": "--late-delay",
    "malformed_callbacks": "--malformed-callbacks",
    "malformed_kinds": "--malformed-kinds",
    "stuck": "--stuck",
    "create_delay_s": "--create-delay",
    "record_lag_s": "--record-lag",
    "status_errors": "--status-errors",
    "status_error_kinds": "--status-error-kinds",
    "hmac_key": "--hmac-key",
    "seed": "--seed",
    "callback_timeout_s": "--callback-timeout",
    "callback_retries": "--callback-retries",
    "callback_retry_delay_s": "--callback-retry-delay",
    "callback_concurrency": "--callback-concurrency",
    "graceful_timeout_s": "--graceful-timeout",
    "log_level": "--log-level",
    "file_size": "--file-size",
    "file_ttl_s": "--file-ttl",
    "file_bytes_per_s": "--file-slow",
    "file_fail_first": "--file-fail-first",
}

_FRACTIONS: Final = (
    "fail_rate",
    "drop_callbacks",
    "duplicate_callbacks",
    "late_callbacks",
    "malformed_callbacks",
    "stuck",
    "status_errors",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """Everything ``kied simulate`` can be told. Validated on construction.

    Fractions (``fail_rate`` and the fault rates) are probabilities in [0, 1], drawn per task
    (callback faults, ``stuck``, ``fail_rate``) or per status query (``status_errors``) from a
    generator seeded with ``seed``.
    """

    host: str = "127.0.0.1"
    #: 0 binds any free port
    port: int = 8081
    #: each task takes a duration drawn uniformly from [min, max]
    duration_s: tuple[float, float] = (5 * SECONDS, 15 * SECONDS)
    fail_rate: float = 0.0
    drop_callbacks: float = 0.0
    duplicate_callbacks: float = 0.0
    late_callbacks: float = 0.0
    late_delay_s: float = 30 * SECONDS
    malformed_callbacks: float = 0.0
    malformed_kinds: tuple[MalformedKind, ...] = tuple(MalformedKind)
    stuck: float = 0.0
    #: how long every create request waits for its answer; the task exists from the start
    create_delay_s: float = 0.0
    #: for this long after it is created, a task is unknown to status queries (``recordInfo
    #: is null``), as KIE's records can lag behind its createTask answers
    record_lag_s: float = 0.0
    status_errors: float = 0.0
    status_error_kinds: tuple[StatusErrorKind, ...] = tuple(StatusErrorKind)
    #: sign callbacks the way KIE does when webhook HMAC is switched on
    hmac_key: bytes | None = None
    seed: int | None = None
    #: one callback attempt; KIE allows the receiver 15 s
    callback_timeout_s: float = 15 * SECONDS
    #: retries after a failed callback attempt, like KIE's "3 retries, then stop"
    callback_retries: int = 3
    #: delay before the first retry; it doubles for each further one
    callback_retry_delay_s: float = 2 * SECONDS
    #: callback POSTs in flight at once
    callback_concurrency: int = 100
    #: hypercorn's bound for in-flight requests once shutdown begins
    graceful_timeout_s: float = 3 * SECONDS
    #: the whole stop, signal to exit, is bounded by this
    shutdown_grace_s: float = 10 * SECONDS
    log_level: str = "info"
    #: result file sizes in bytes, drawn per file from [min, max]; ``None``: by type
    #: (``_sim_files.DEFAULT_FILE_SIZES``)
    file_size: tuple[int, int] | None = None
    #: a result file answers 404 this long after its task ended (``math.inf``: never)
    file_ttl_s: float = math.inf
    #: result files are sent at this many bytes per second (``math.inf``: as fast as possible)
    file_bytes_per_s: float = math.inf
    #: the first N requests for each result file answer 503
    file_fail_first: int = 0

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() for c in self.host):
            _invalid("host", f"not a host name or address: {self.host!r}")
        if isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            _invalid("port", f"must be a port number in [0, 65535], got {self.port}")
        low, high = self.duration_s
        if not (_finite(low) and _finite(high) and 0 <= low <= high):
            _invalid(
                "duration_s", f"must be SECONDS or MIN-MAX with 0 <= MIN <= MAX, got {low}-{high}"
            )
        for name in _FRACTIONS:
            value = getattr(self, name)
            if not (_finite(value) and 0.0 <= value <= 1.0):
                _invalid(name, f"must be a fraction in [0, 1], got {value}")
        for name in (
            "late_delay_s",
            "create_delay_s",
            "record_lag_s",
            "callback_retry_delay_s",
            "graceful_timeout_s",
        ):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                _invalid(name, f"must be a number of seconds >= 0, got {value}")
        for name in ("callback_timeout_s", "shutdown_grace_s"):
            value = getattr(self, name)
            if not (_finite(value) and value > 0):
                _invalid(name, f"must be a number of seconds > 0, got {value}")
        if not self.malformed_kinds:
            _invalid("malformed_kinds", "needs at least one kind")
        if not self.status_error_kinds:
            _invalid("status_error_kinds", "needs at least one kind")
        if self.hmac_key is not None and not self.hmac_key:
            _invalid("hmac_key", "must not be empty")
        if self.callback_retries < 0:
            _invalid("callback_retries", f"must be >= 0, got {self.callback_retries}")
        if self.callback_concurrency < 1:
            _invalid("callback_concurrency", f"must be >= 1, got {self.callback_concurrency}")
        if self.file_size is not None:
            low, high = self.file_size
            if not (0 < low <= high <= MAX_FILE_SIZE):
                _invalid(
                    "file_size",
                    f"must be BYTES or MIN-MAX with 0 < MIN <= MAX <= {MAX_FILE_SIZE}, "
                    f"got {low}-{high}",
                )
        if not (self.file_ttl_s > 0):  # inf is fine, NaN is not
            _invalid("file_ttl_s", f"must be a number of seconds > 0, got {self.file_ttl_s}")
        if not (self.file_bytes_per_s > 0):
            _invalid(
                "file_bytes_per_s", f"must be bytes per second > 0, got {self.file_bytes_per_s}"
            )
        if self.file_fail_first < 0:
            _invalid("file_fail_first", f"must be >= 0, got {self.file_fail_first}")
        if self.log_level not in _LOG_LEVELS:
            _invalid("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _invalid(field_name: str, problem: str) -> NoReturn:
    raise ConfigError(_FLAG.get(field_name, field_name), problem)


# ============================================================================================
# Command line


_EPILOG = """\
KIE endpoints (all need "Authorization: Bearer <anything>"):
  Market        POST /api/v1/jobs/createTask         GET /api/v1/jobs/recordInfo?taskId=
  Veo 3.1       POST /api/v1/veo/generate            GET /api/v1/veo/record-info?taskId=
  Runway        POST /api/v1/runway/generate         GET /api/v1/runway/record-detail?taskId=
  Aleph         POST /api/v1/aleph/generate          GET /api/v1/aleph/record-info?taskId=
  Suno          POST /api/v1/generate                GET /api/v1/generate/record-info?taskId=
  4o Image      POST /api/v1/gpt4o-image/generate    GET /api/v1/gpt4o-image/record-info?taskId=
  Flux Kontext  POST /api/v1/flux/kontext/generate   GET /api/v1/flux/kontext/record-info?taskId=
  Midjourney    POST /api/v1/mj/generate             GET /api/v1/mj/record-info?taskId=
  Luma          POST /api/v1/modify/generate         GET /api/v1/modify/record-info?taskId=

Control endpoints:
  GET  /_sim/stats[?taskId=ID]          status queries, callbacks and timings per task
  POST /_sim/tasks/ID/complete          finish a task now; body {"fail": true} to fail it
  GET  /_sim/files/ID/NAME              the result files behind the result URLs
  GET  /healthz

A create request may pin its task with "X-Sim-Duration: SECONDS" and
"X-Sim-Outcome: success|fail|stuck", and have its answer held back with
"X-Sim-Create-Delay: SECONDS" (overrides --create-delay). Leave out callBackUrl
to get no callbacks.

Result files are real files of the type their name says (png, jpg/jpeg, mp4,
mp3, wav; anything else is octet-stream), streamed with Content-Length; their
size and bytes follow from the task id and name alone. Default sizes by type:
png 1M-4M, jpg 200K-2M, mp4 4M-20M, mp3 3M-8M, wav 10M-40M, other 100K-1M.
/_sim/stats counts the requests for each file (files: requests, refused,
expired, served, bytes_sent).
The listening URL is printed as one line: "kied simulate listening on URL".
"""


def _build_parser() -> argparse.ArgumentParser:
    d = SimulatorConfig()
    p = FlagParser(
        prog="kied simulate",
        description="A fake KIE.ai API with fault injection, for developing, testing and "
        "benchmarking kied without spending credits.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    low, high = d.duration_s
    net = p.add_argument_group("listening")
    net.add_argument("--host", help=f"address to listen on (default: {d.host})")
    net.add_argument("--port", help=f"port to listen on; 0 picks a free one (default: {d.port})")
    tasks = p.add_argument_group("tasks")
    tasks.add_argument(
        "--duration",
        metavar="SECONDS|MIN-MAX",
        help=f"how long a task takes, fixed or uniform in [MIN, MAX] (default: {low:g}-{high:g})",
    )
    tasks.add_argument(
        "--fail-rate", metavar="FRACTION", help="fraction of tasks that fail (default: 0)"
    )
    tasks.add_argument(
        "--stuck",
        metavar="FRACTION",
        help="fraction of tasks that never leave a non-terminal state (default: 0)",
    )
    tasks.add_argument(
        "--create-delay",
        metavar="SECONDS",
        help="answer each create request this many seconds late; the task is created, and its "
        "clock started, at once, so a short task's callback can come before the answer, and a "
        "client that gives up meanwhile leaves the task behind (default: 0)",
    )
    tasks.add_argument(
        "--record-lag",
        metavar="SECONDS",
        help='status queries answer "recordInfo is null" for a task this many seconds after it'
        " is created (default: 0)",
    )
    tasks.add_argument(
        "--seed", help="seed for every random draw, for reproducible runs (default: random)"
    )
    faults = p.add_argument_group("callback faults (each a fraction of tasks, default 0)")
    faults.add_argument(
        "--drop-callbacks", metavar="FRACTION", help="send no callback at all for these tasks"
    )
    faults.add_argument(
        "--duplicate-callbacks", metavar="FRACTION", help="send every callback twice"
    )
    faults.add_argument(
        "--late-callbacks",
        metavar="FRACTION",
        help="send the callbacks --late-delay seconds after the task finished",
    )
    faults.add_argument(
        "--late-delay",
        metavar="SECONDS",
        help=f"how late a late callback is (default: {d.late_delay_s:g})",
    )
    faults.add_argument(
        "--malformed-callbacks",
        metavar="FRACTION",
        help="send broken callback bodies (see --malformed-kinds)",
    )
    faults.add_argument(
        "--malformed-kinds",
        metavar="KIND,...",
        help="the ways a malformed body is broken, one drawn per task: "
        f"{', '.join(MalformedKind)} (default: all)",
    )
    status = p.add_argument_group("status query faults")
    status.add_argument(
        "--status-errors",
        metavar="FRACTION",
        help="fraction of status queries refused with 429, 455 or 5xx, "
        "as HTTP statuses or as HTTP 200 envelopes (default: 0)",
    )
    status.add_argument(
        "--status-error-kinds",
        metavar="KIND,...",
        help=f"the refusals to draw from: {', '.join(StatusErrorKind)} (default: all)",
    )
    delivery = p.add_argument_group("callback delivery")
    delivery.add_argument(
        "--hmac-key",
        metavar="KEY",
        help="sign callbacks like KIE: X-Webhook-Timestamp (unix seconds) and "
        "X-Webhook-Signature = base64(HMAC-SHA256(KEY, taskId + '.' + timestamp))",
    )
    delivery.add_argument(
        "--callback-timeout",
        metavar="SECONDS",
        help=f"time allowed for one callback attempt (default: {d.callback_timeout_s:g})",
    )
    delivery.add_argument(
        "--callback-retries",
        metavar="N",
        help="retries after a failed callback attempt, then give up "
        f"(default: {d.callback_retries})",
    )
    delivery.add_argument(
        "--callback-retry-delay",
        metavar="SECONDS",
        help="delay before the first retry, doubling for each further one "
        f"(default: {d.callback_retry_delay_s:g})",
    )
    delivery.add_argument(
        "--callback-concurrency",
        metavar="N",
        help=f"callback POSTs in flight at once (default: {d.callback_concurrency})",
    )
    files = p.add_argument_group("result files")
    files.add_argument(
        "--file-size",
        metavar="BYTES|MIN-MAX",
        help="size of each result file, fixed or drawn per file from [MIN, MAX]; K, M and G "
        "suffixes are powers of 1024 (e.g. 1K-4K, 2G); a size below the smallest file of the "
        "type is raised to it (default: by type, see below)",
    )
    files.add_argument(
        "--file-ttl",
        metavar="SECONDS",
        help="a result file answers 404 once this many seconds have passed since its task "
        "ended, as KIE's storage drops old results (default: never)",
    )
    files.add_argument(
        "--file-slow",
        metavar="BYTES_PER_S",
        help="send result files at this rate (K, M, G suffixes allowed; default: unlimited)",
    )
    files.add_argument(
        "--file-fail-first",
        metavar="N",
        help="the first N requests for each result file answer 503 (default: 0)",
    )
    misc = p.add_argument_group("process")
    misc.add_argument(
        "--graceful-timeout",
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, time allowed for requests in flight "
        f"(default: {d.graceful_timeout_s:g})",
    )
    misc.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        help=f"log level on stderr (default: {d.log_level})",
    )
    return p


_K = TypeVar("_K", MalformedKind, StatusErrorKind)


def _kinds(flag: str, text: str, kind: type[_K]) -> tuple[_K, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(flag, "needs at least one kind")
    known = {k.value: k for k in kind}
    for name in names:
        if name not in known:
            raise ConfigError(flag, f"unknown kind {name!r}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(known[name] for name in names))


def parse_simulator_args(argv: Sequence[str]) -> SimulatorConfig:
    """Build the configuration from ``kied simulate`` arguments (without the command words).

    Args:
        argv: the arguments after ``kied simulate``.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: a flag is unknown or its value is invalid; the error names the flag.
        SystemExit: ``--help`` was given; the help has been printed (code 0).
    """
    ns = _build_parser().parse_args(list(argv))
    kw: dict[str, Any] = {}
    if ns.host is not None:
        kw["host"] = ns.host
    if ns.port is not None:
        kw["port"] = parse_integer("--port", ns.port)
    if ns.duration is not None:
        kw["duration_s"] = parse_duration("--duration", ns.duration)
    for name in _FRACTIONS:
        text = getattr(ns, name)
        if text is not None:
            kw[name] = parse_number(_FLAG[name], text)
    for name, attr in (
        ("late_delay_s", "late_delay"),
        ("create_delay_s", "create_delay"),
        ("record_lag_s", "record_lag"),
        ("callback_timeout_s", "callback_timeout"),
        ("callback_retry_delay_s", "callback_retry_delay"),
        ("graceful_timeout_s", "graceful_timeout"),
    ):
        text = getattr(ns, attr)
        if text is not None:
            kw[name] = parse_number(_FLAG[name], text)
    for name in ("callback_retries", "callback_concurrency", "seed"):
        text = getattr(ns, name)
        if text is not None:
            kw[name] = parse_integer(_FLAG[name], text)
    if ns.malformed_kinds is not None:
        kw["malformed_kinds"] = _kinds("--malformed-kinds", ns.malformed_kinds, MalformedKind)
    if ns.status_error_kinds is not None:
        kw["status_error_kinds"] = _kinds(
            "--status-error-kinds", ns.status_error_kinds, StatusErrorKind
        )
    if ns.hmac_key is not None:
        kw["hmac_key"] = ns.hmac_key.encode()
    if ns.log_level is not None:
        kw["log_level"] = ns.log_level
    if ns.file_size is not None:
        kw["file_size"] = parse_byte_range("--file-size", ns.file_size)
    if ns.file_ttl is not None:
        kw["file_ttl_s"] = parse_number("--file-ttl", ns.file_ttl)
    if ns.file_slow is not None:
        kw["file_bytes_per_s"] = float(
            parse_byte_range("--file-slow", ns.file_slow, single=True)[0]
        )
    if ns.file_fail_first is not None:
        kw["file_fail_first"] = parse_integer("--file-fail-first", ns.file_fail_first)
    return SimulatorConfig(**kw)


_UNITS: Final[Mapping[str, int]] = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_BYTES: Final = r"\s*(\d+)\s*([KMGkmg]?)\s*"


def parse_byte_range(flag: str, text: str, *, single: bool = False) -> tuple[int, int]:
    """``BYTES`` or ``MIN-MAX`` (``MIN-MAX`` only unless ``single``), K/M/G being 1024-powers.

    Raises:
        ConfigError: naming ``flag``, for anything else.
    """

    def value(digits: str, unit: str) -> int:
        return int(digits) * _UNITS[unit.upper()]

    if m := re.fullmatch(_BYTES, text):
        n = value(m[1], m[2])
        return n, n
    if not single and (m := re.fullmatch(f"{_BYTES}-{_BYTES}", text)):
        low, high = value(m[1], m[2]), value(m[3], m[4])
        if low <= high:
            return low, high
    shape = "BYTES" if single else "BYTES or MIN-MAX with MIN <= MAX"
    raise ConfigError(flag, f"must be {shape} (K, M, G suffixes allowed), not {text!r}")
