"""``kied demo``: a simulated KIE and a real daemon in one process, N jobs, one table.

::

    trio.run(_run)
    ├── signal watcher            first SIGINT/SIGTERM: stop early, still report
    ├── serve_simulator()         KIE, with the chosen faults, on 127.0.0.1:0
    ├── kied.daemon.run()         on a port picked beforehand (its callback URL must be known)
    └── the work                  submit N jobs over /v1, long-poll each until it ends
    then: stop the daemon, read /_sim/stats, stop the simulator, read the store, print

Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import math
import secrets
import signal
import socket
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import httpx
import trio

from kied._apierror import api_error_line
from kied._flags import FlagParser, parse_duration, parse_integer, parse_number
from kied.core.jobs import TERMINAL_STATES, Job, JobState
from kied.daemon import run
from kied.errors import ConfigError, StoreError
from kied.kie.client import CREATE_LIMIT
from kied.kie.simulator import SimulatorConfig, serve_simulator
from kied.settings import NoLockSettings, Settings, SqliteStoreSettings
from kied.store import CallbackEffect, StoredCallback, open_store

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["MIXES", "DemoOptions", "DemoResult", "format_report", "main", "parse_demo_args"]

logger = logging.getLogger(__name__)

_MODEL: Final = "google/nano-banana"
#: Requests to the daemon in flight at once (submissions and long polls together).
_CONCURRENCY: Final = 64
#: One long poll of a job holds a request open this long at most.
_FOLLOW_WAIT_S: Final = 5.0
_REQUEST_S: Final = 10.0
#: Ports tried for the daemon: a port picked free can be taken before the daemon binds it.
_PORT_ATTEMPTS: Final = 3
_TTY_REFRESH_S: Final = 0.1
_PLAIN_REFRESH_S: Final = 1.0

_DEFAULT_MIX: Final = "clean"

_FAULTS: Final = (
    "fail_rate",
    "drop_callbacks",
    "duplicate_callbacks",
    "late_callbacks",
    "malformed_callbacks",
    "stuck",
    "status_errors",
)

#: ``--mix`` presets; a fault flag given on its own wins over its preset.
MIXES: Final[Mapping[str, Mapping[str, float]]] = {
    "clean": {},
    "flaky": {
        "fail_rate": 0.1,
        "drop_callbacks": 0.1,
        "duplicate_callbacks": 0.1,
        "late_callbacks": 0.05,
        "malformed_callbacks": 0.05,
        "status_errors": 0.1,
    },
    "hostile": {
        "fail_rate": 0.2,
        "drop_callbacks": 0.3,
        "duplicate_callbacks": 0.3,
        "late_callbacks": 0.2,
        "malformed_callbacks": 0.2,
        "stuck": 0.05,
        "status_errors": 0.3,
    },
}


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """What ``kied demo`` was asked for; fault rates are fractions in [0, 1]."""

    jobs: int = 50
    duration_s: tuple[float, float] = (2.0, 8.0)
    mix: str = _DEFAULT_MIX
    fail_rate: float = 0.0
    drop_callbacks: float = 0.0
    duplicate_callbacks: float = 0.0
    late_callbacks: float = 0.0
    late_delay_s: float = 10.0
    malformed_callbacks: float = 0.0
    stuck: float = 0.0
    status_errors: float = 0.0
    #: every job's deadline; lost callbacks are found by polling, within seconds while few
    #: jobs are in flight
    timeout_s: float = 90.0
    seed: int | None = None
    verbose: bool = False

    def queue_s(self) -> float:
        """How long the last job waits in kied's createTask queue, at KIE's create rate."""
        per_window, window_s = CREATE_LIMIT
        return float(math.ceil(self.jobs / per_window) - 1) * window_s

    def faults(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _FAULTS}

    def simulator_config(self) -> SimulatorConfig:
        """The simulator's configuration: these faults, on any free port of 127.0.0.1.

        Raises:
            ConfigError: a value is out of range; the error names the flag.
        """
        return SimulatorConfig(
            host="127.0.0.1",
            port=0,
            duration_s=self.duration_s,
            late_delay_s=self.late_delay_s,
            seed=self.seed,
            graceful_timeout_s=1.0,
            fail_rate=self.fail_rate,
            drop_callbacks=self.drop_callbacks,
            duplicate_callbacks=self.duplicate_callbacks,
            late_callbacks=self.late_callbacks,
            malformed_callbacks=self.malformed_callbacks,
            stuck=self.stuck,
            status_errors=self.status_errors,
        )


# ============================================================================================
# Command line


_DESCRIPTION: Final = """\
Start a simulated KIE and a kied daemon in this process, submit jobs through the
daemon's HTTP API under a chosen fault mix, and end with a table: jobs by final
state, callbacks sent, lost and repeated, status queries per job, and the time
from KIE's completion to kied's record. Ctrl-C stops early and still prints it.

What to expect: kied sends KIE at most 20 new tasks per 10 s, as KIE allows, so
N jobs take at least N/2 s to start; the time a job waits in kied's createTask
queue is not counted in its deadline (--timeout counts from its createTask). A
job whose callback is lost or unreadable is found by polling: within a few seconds
of its task's end while few jobs are in flight, later as more share the
status-query budget (KIED_STATUS_QUERIES_PER_S), overdue ones first; a stuck one
ends at its deadline."""


def _epilog() -> str:
    lines = ["mixes (a fault flag wins over its mix):"]
    for name, rates in MIXES.items():
        flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in rates.items())
        lines.append(f"  {name:<8} {flags or 'no faults'}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    d = DemoOptions()
    p = FlagParser(
        prog="kied demo",
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--jobs", metavar="N", help=f"how many jobs to submit (default {d.jobs})")
    low, high = d.duration_s
    p.add_argument(
        "--duration",
        metavar="SECONDS|MIN-MAX",
        help=f"how long KIE takes per task (default {low:g}-{high:g})",
    )
    p.add_argument("--mix", choices=sorted(MIXES), help=f"a fault preset (default {d.mix})")
    for name, flag, what in (
        ("fail_rate", "--fail-rate", "tasks that fail"),
        ("drop_callbacks", "--drop-callbacks", "tasks whose callbacks never come"),
        ("duplicate_callbacks", "--duplicate-callbacks", "tasks whose callbacks come twice"),
        ("late_callbacks", "--late-callbacks", "tasks whose callbacks come --late-delay late"),
        ("malformed_callbacks", "--malformed-callbacks", "tasks whose callbacks are broken"),
        ("stuck", "--stuck", "tasks that never finish"),
        ("status_errors", "--status-errors", "status queries refused (429, 455, 5xx)"),
    ):
        p.add_argument(flag, dest=name, metavar="FRACTION", help=f"fraction of {what}")
    p.add_argument(
        "--late-delay",
        metavar="SECONDS",
        help=f"how late a late callback is (default {d.late_delay_s:g})",
    )
    p.add_argument(
        "--timeout", metavar="SECONDS", help=f"each job's deadline (default {d.timeout_s:g})"
    )
    p.add_argument("--seed", help="seed for the simulator's draws, for a repeatable run")
    p.add_argument("--verbose", action="store_true", help="log the daemon at INFO, not WARNING")
    return p


def parse_demo_args(argv: Sequence[str]) -> DemoOptions:
    """Build the options from ``kied demo`` arguments.

    Raises:
        ConfigError: a flag is unknown or its value is wrong; the error names the flag.
        SystemExit: ``--help`` was given and printed.
    """
    ns = _build_parser().parse_args(list(argv))
    kw: dict[str, Any] = {}
    if ns.jobs is not None:
        kw["jobs"] = parse_integer("--jobs", ns.jobs)
        if kw["jobs"] < 1:
            raise ConfigError("--jobs", f"must be 1 or more, not {ns.jobs!r}")
    if ns.duration is not None:
        kw["duration_s"] = parse_duration("--duration", ns.duration)
    mix = ns.mix or _DEFAULT_MIX
    kw["mix"] = mix
    for name in _FAULTS:
        text = getattr(ns, name)
        flag = "--" + name.replace("_", "-")
        value = MIXES[mix].get(name, 0.0) if text is None else parse_number(flag, text)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(flag, f"must be a fraction in [0, 1], not {text!r}")
        kw[name] = value
    if ns.late_delay is not None:
        kw["late_delay_s"] = parse_number("--late-delay", ns.late_delay)
        if kw["late_delay_s"] < 0:
            raise ConfigError("--late-delay", f"must be 0 seconds or more, not {ns.late_delay!r}")
    if ns.timeout is not None:
        kw["timeout_s"] = parse_number("--timeout", ns.timeout)
        if not 0 < kw["timeout_s"] <= 30 * 24 * 3600:
            raise ConfigError(
                "--timeout", f"must be more than 0 and at most 30 days, not {ns.timeout!r}"
            )
    if ns.seed is not None:
        kw["seed"] = parse_integer("--seed", ns.seed)
    kw["verbose"] = ns.verbose
    options = DemoOptions(**kw)
    options.simulator_config()  # validates what the simulator checks
    return options


def main(argv: Sequence[str]) -> int:
    """``kied demo``: run it and print the table on standard output.

    Returns:
        0 when the demo ran (also when stopped early by SIGINT or SIGTERM), 2 for a bad
        flag (one line naming it), 1 when it could not start, 130 after a second signal.
    """
    try:
        options = parse_demo_args(argv)
    except ConfigError as exc:
        print(f"kied demo: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    progress = _Progress(sys.stderr, live=sys.stderr.isatty())
    _configure_logging(progress, verbose=options.verbose)
    with tempfile.TemporaryDirectory(prefix="kied-demo-") as workdir:
        failure: BaseException | None = None
        try:
            result = trio.run(_run, options, Path(workdir), progress)
        except* (OSError, StoreError, httpx.HTTPError, trio.TooSlowError) as group:
            failure = _first_leaf(group)
            result = None
        except* KeyboardInterrupt:  # before the signal watcher was in place
            result = None
    if failure is not None:
        progress.clear()
        print(f"kied demo: could not run: {failure}", file=sys.stderr)
        return 1
    if result is None:
        progress.clear()
        print("kied demo: stopped", file=sys.stderr)
        return 130
    print(format_report(options, result))
    return 0


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# ============================================================================================
# Output on stderr


class _Progress:
    """One live line on a terminal (redrawn in place), or plain lines elsewhere."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self._drawn = False

    def draw(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def line(self, text: str) -> None:
        """A line that stays, above the live one."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()


class _LogHandler(logging.StreamHandler[TextIO]):
    """Log lines go above the progress line instead of through it."""

    def __init__(self, progress: _Progress) -> None:
        super().__init__(progress.stream)
        self._progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self._progress.clear()
        super().emit(record)


def _configure_logging(progress: _Progress, *, verbose: bool) -> None:
    handler = _LogHandler(progress)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True
    )
    # One line per request from httpx would drown everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass(slots=True)
class _Tracker:
    """What the work has seen so far, for the progress line."""

    total: int
    started_t: float
    states: dict[int, str] = field(default_factory=dict)
    submit_failures: int = 0
    first_failure: str | None = None

    def submit_failed(self, problem: str) -> None:
        self.submit_failures += 1
        if self.first_failure is None:
            self.first_failure = problem
            logger.warning("[GEN] demo: a job could not be submitted: %s", problem)

    def ended(self) -> int:
        return sum(1 for s in self.states.values() if s in TERMINAL_STATES)

    def counts(self) -> Counter[str]:
        return Counter(self.states.values())

    def render(self, *, bar: bool) -> str:
        counts = self.counts()
        ended = self.ended()
        elapsed = trio.current_time() - self.started_t
        # Only the end of a job is seen at once (a long poll returns then); "running" covers
        # submitting and pending alike.
        parts = [f"{counts[s.value]} {s.value}" for s in JobState if s in TERMINAL_STATES]
        parts = [p for p in parts if not p.startswith("0 ")]
        running = len(self.states) - ended
        unsent = self.total - len(self.states) - self.submit_failures
        for count, what in (
            (running, "running"),
            (unsent, "to submit"),
            (self.submit_failures, "not submitted"),
        ):
            if count:
                parts.append(f"{count} {what}")
        detail = ", ".join(parts)
        if bar:
            width = 24
            filled = width * (ended + self.submit_failures) // max(self.total, 1)
            gauge = "#" * filled + "." * (width - filled)
            return f"[{gauge}] {ended}/{self.total} ended  {detail}  {elapsed:.1f} s"
        return f"kied demo: {elapsed:.1f} s: {ended}/{self.total} ended ({detail})"


async def _show_progress(tracker: _Tracker, progress: _Progress) -> None:
    last_key: tuple[object, ...] | None = None
    last_plain_t = -math.inf
    while True:
        if progress.live:
            progress.draw(tracker.render(bar=True))
        else:
            # Plain lines (a log, a pipe): one when something changed, at most so often.
            key = (tracker.submit_failures, len(tracker.states), *sorted(tracker.counts().items()))
            now_t = trio.current_time()
            if key != last_key and now_t - last_plain_t >= _PLAIN_REFRESH_S:
                progress.draw(tracker.render(bar=False))
                last_key, last_plain_t = key, now_t
        await trio.sleep(_TTY_REFRESH_S)


# ============================================================================================
# The run


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """What a demo run leaves to report on."""

    jobs: list[Job]
    callbacks: list[StoredCallback]
    sim_tasks: dict[str, dict[str, Any]]
    submitted: int
    submit_failures: int
    elapsed_s: float
    stopped_early: bool


@dataclass(frozen=True, slots=True)
class _RunningDaemon:
    url: str
    settings: Settings
    stop: trio.Event
    done: trio.Event


async def _run(options: DemoOptions, workdir: Path, progress: _Progress) -> DemoResult | None:
    """The whole demo, in one Trio run; ``None`` when stopped by a second signal."""
    started_t = trio.current_time()
    work = trio.CancelScope()
    tracker = _Tracker(total=options.jobs, started_t=started_t)
    api_token = secrets.token_urlsafe(16)
    store = SqliteStoreSettings(path=workdir / "kied.db")
    stats: dict[str, Any] = {}
    async with trio.open_nursery() as root:
        watcher: trio.CancelScope = await root.start(
            _watch_signals, work, root.cancel_scope, progress
        )
        sim_stop = trio.Event()
        sim_url: str = await root.start(
            partial(serve_simulator, options.simulator_config(), shutdown_trigger=sim_stop.wait)
        )

        def settings_for(port: int) -> Settings:
            return Settings(
                host="127.0.0.1",
                port=port,
                store=store,
                # The database is this run's own: nobody else can be leader.
                lock=NoLockSettings(),
                callback_token=secrets.token_urlsafe(16),
                kie_api_key="kied-demo",
                kie_base_url=sim_url,
                public_url=f"http://127.0.0.1:{port}",
                api_token=api_token,
                job_timeout_s=options.timeout_s,
                # However many jobs: the last waits its turn at KIE's create rate.
                create_queue_max_s=max(3600.0, 2 * options.queue_s()),
                log_level="INFO" if options.verbose else "WARNING",
                shutdown_grace_s=5.0,
            )

        daemon = await _start_daemon(root, settings_for)
        progress.line(
            f"kied demo: KIE simulated at {sim_url}, kied at {daemon.url}; "
            f"{options.jobs} jobs, mix {_describe_mix(options)}"
        )
        with work:
            # Every job ends by its deadline at the latest; this only guards against a bug.
            with trio.move_on_after(
                options.queue_s() + options.timeout_s + options.duration_s[1] + 60
            ) as guard:
                await _submit_and_follow(daemon.url, api_token, options, tracker, progress)
        elapsed_s = trio.current_time() - started_t
        stopped_early = work.cancel_called or guard.cancelled_caught
        progress.clear()
        progress.line(tracker.render(bar=False) + (" - stopped early" if stopped_early else ""))

        daemon.stop.set()
        with trio.move_on_after(daemon.settings.shutdown_grace_s + 1):
            await daemon.done.wait()
        stats = await _sim_stats(sim_url)
        sim_stop.set()
        watcher.cancel()
    if root.cancel_scope.cancelled_caught:
        return None
    with trio.fail_after(_REQUEST_S):
        async with open_store(store) as opened:
            jobs = await opened.list_jobs(states=None, limit=max(options.jobs, 1))
            # Every row: a few callbacks per job at most, so this is bounded by the run.
            callbacks = await opened.list_callbacks(limit=2**31)
    return DemoResult(
        jobs=jobs,
        callbacks=callbacks,
        sim_tasks=stats.get("tasks", {}),
        submitted=len(tracker.states),
        submit_failures=tracker.submit_failures,
        elapsed_s=elapsed_s,
        stopped_early=stopped_early,
    )


async def _watch_signals(
    work: trio.CancelScope,
    root: trio.CancelScope,
    progress: _Progress,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    with (
        trio.CancelScope() as scope,
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):
        task_status.started(scope)
        async for signum in signals:
            if not work.cancel_called:
                progress.line(
                    f"kied demo: {signal.Signals(signum).name}: stopping early "
                    "(again to quit without the table)"
                )
                work.cancel(reason="stopped by a signal")
            else:
                root.cancel(reason="stopped by a second signal")
                return


async def _start_daemon(
    nursery: trio.Nursery, settings_for: Callable[[int], Settings]
) -> _RunningDaemon:
    # The daemon's public URL (in every callback URL it gives KIE) is part of its
    # settings, so its port is chosen before it starts: bound to port 0 to find a free
    # one, then released. Another process could take it in between; then try another.
    lost: BaseExceptionGroup[OSError] | None = None
    for _ in range(_PORT_ATTEMPTS):
        settings = settings_for(_free_port())
        stop, done = trio.Event(), trio.Event()
        try:
            urls: list[str] = await nursery.start(_run_daemon, settings, stop, done)
        except* OSError as group:
            lost = group
        else:
            return _RunningDaemon(url=urls[0], settings=settings, stop=stop, done=done)
    assert lost is not None
    raise lost


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _run_daemon(
    settings: Settings,
    stop: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await run(settings, stop=stop, task_status=task_status)
    finally:
        done.set()


async def _submit_and_follow(
    url: str, api_token: str, options: DemoOptions, tracker: _Tracker, progress: _Progress
) -> None:
    limiter = trio.CapacityLimiter(_CONCURRENCY)
    limits = httpx.Limits(max_connections=_CONCURRENCY, max_keepalive_connections=_CONCURRENCY)
    async with (
        httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {api_token}"},
            timeout=httpx.Timeout(_REQUEST_S, read=_FOLLOW_WAIT_S + _REQUEST_S),
            limits=limits,
            trust_env=False,
        ) as client,
        trio.open_nursery() as outer,
    ):
        outer.start_soon(_show_progress, tracker, progress)
        async with trio.open_nursery() as nursery:
            for index in range(options.jobs):
                nursery.start_soon(_one_job, client, limiter, index, options, tracker)
        outer.cancel_scope.cancel()


async def _one_job(
    client: httpx.AsyncClient,
    limiter: trio.CapacityLimiter,
    index: int,
    options: DemoOptions,
    tracker: _Tracker,
) -> None:
    body = {
        "model": _MODEL,
        "input": {"prompt": f"kied demo image {index}", "output_format": "png"},
        "timeout_s": options.timeout_s,
        "metadata": {"demo": index},
    }
    try:
        async with limiter:
            response = await client.post("/v1/jobs", json=body)
        job = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        tracker.submit_failed(str(exc) or type(exc).__name__)
        return
    if response.status_code not in (200, 201) or not isinstance(job, dict):
        tracker.submit_failed(api_error_line(response.status_code, job, response.text))
        return
    tracker.states[index] = job["state"]
    while not job.get("terminal"):
        try:
            async with limiter:
                response = await client.get(
                    f"/v1/jobs/{job['id']}", params={"wait": _FOLLOW_WAIT_S}
                )
            response.raise_for_status()
            job = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            # The daemon is in this process: a failure here is a hiccup, so ask again.
            logger.warning("[GEN] demo: job %s: %s", job.get("id"), exc)
            await trio.sleep(0.5)
            continue
        tracker.states[index] = job["state"]


async def _sim_stats(sim_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=sim_url, timeout=_REQUEST_S, trust_env=False) as client:
        response = await client.get("/_sim/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


# ============================================================================================
# The table


def format_report(options: DemoOptions, result: DemoResult) -> str:
    """The table ``kied demo`` ends with."""
    out: list[str] = []
    add = out.append
    ended = sum(1 for j in result.jobs if j.terminal)
    add(
        f"kied demo: {result.submitted} of {options.jobs} jobs submitted, {ended} ended, "
        f"in {result.elapsed_s:.1f} s" + (" (stopped early)" if result.stopped_early else "")
    )
    add(
        f"  tasks take {_range(options.duration_s)}; job timeout {options.timeout_s:g} s"
        + (f"; seed {options.seed}" if options.seed is not None else "")
    )
    add(f"  mix {_describe_mix(options)}")
    per_window, window_s = CREATE_LIMIT
    add(
        f"  each job waits its turn in kied's createTask queue ({per_window} per {window_s:g} s,"
        " KIE's limit),"
    )
    add("  then ends by KIE's callback or, when that is lost, by polling KIE; its timeout")
    add("  counts from its createTask, not from its wait in the queue")

    add("")
    add("jobs by final state (and what ended them)")
    for state in JobState:
        found = [j for j in result.jobs if j.state is state]
        if not found:
            continue
        ended_by = Counter(j.ended_by.value for j in found if j.ended_by is not None)
        how = ", ".join(f"by {k} {v}" for k, v in sorted(ended_by.items()))
        late = sum(1 for j in found if j.late)
        if late:
            how += f"; {late} after the deadline"
        add(_row(state.value, len(found), how))
    if result.submit_failures:
        add(_row("not submitted", result.submit_failures))
    add(_row("total", len(result.jobs)))

    add("")
    add("time per job")
    add(
        _latency_row(
            "created to ended",
            [j.ended_at - j.created_at for j in result.jobs if j.ended_at is not None],
        )
    )
    # The first createTask moved each deadline by the job's wait in the queue.
    waits = [
        max(0.0, j.deadline_at - j.created_at - options.timeout_s)
        for j in result.jobs
        if j.submit_count > 0
    ]
    row = _latency_row("in kied's createTask queue", waits)
    if waits:
        row += f", max {_duration_text(max(waits))}"
    add(row)
    never_sent = sum(1 for j in result.jobs if j.terminal and j.submit_count == 0 and not j.task_id)
    if never_sent:
        add(_row("  ended before it was sent", never_sent))

    tasks = result.sim_tasks
    withheld = _sum(tasks, "callbacks_dropped")
    given_up = _sum(tasks, "callbacks_given_up")
    unsent_late = sum(
        1
        for t in tasks.values()
        if "late" in t.get("faults", ())
        and "drop" not in t.get("faults", ())
        and t.get("completed_at") is not None
        and not t.get("callbacks_sent")
    )
    callbacks = result.callbacks
    add("")
    add("callbacks")
    malformed_sent = sum(
        int(t.get("callbacks_sent") or 0)
        for t in tasks.values()
        if "malformed" in t.get("faults", ())
    )
    unreadable = sum(1 for c in callbacks if c.entry.outcome == "unknown")
    add(_row("sent by KIE", _sum(tasks, "callbacks_sent"), "POSTs, repeats and retries included"))
    add(_row("  malformed", malformed_sent, f"broken bodies; {unreadable} unreadable by kied"))
    add(_row("delivered", _sum(tasks, "callbacks_delivered"), "answered 2xx by kied"))
    add(_row("lost", withheld + given_up, f"withheld by KIE {withheld}, given up {given_up}"))
    if unsent_late:
        add(_row("late, not sent yet", unsent_late, "still due in KIE when the demo stopped"))
    add(_row("received by kied", len(callbacks), "rows in the callback inbox"))
    add(_row("  repeats", _repeats(callbacks), "the same body again for the same task"))
    effects = Counter(c.effect for c in callbacks)
    for effect, label in (
        (CallbackEffect.CHANGED, "  applied to a job"),
        (CallbackEffect.NO_OP, "  no-op, job already ended"),
        (CallbackEffect.NOT_APPLICABLE, "  nothing to apply"),
        (CallbackEffect.NO_JOB, "  no job matched"),
        (CallbackEffect.REJECTED, "  rejected, unauthenticated"),
    ):
        if effects[effect] or effect is CallbackEffect.CHANGED:
            add(_row(label, effects[effect]))

    add("")
    add("status queries per job (KIE's count)")
    queries = [
        int(tasks[j.task_id].get("status_queries") or 0)
        for j in result.jobs
        if j.task_id is not None and j.task_id in tasks
    ]
    if queries:
        add(
            f"  {'mean':<{_LABEL}}{sum(queries) / len(queries):>{_VALUE}.2f}   "
            f"max {max(queries)}, total {sum(queries)}, refused {_sum(tasks, 'status_errors')}"
        )
    else:
        add(f"  {'mean':<{_LABEL}}{'-':>{_VALUE}}")

    latencies: dict[str, list[float]] = {}
    for job in result.jobs:
        task = tasks.get(job.task_id or "")
        completed_at = task.get("completed_at") if task else None
        if (
            job.state in (JobState.SUCCEEDED, JobState.FAILED)
            and job.ended_at is not None
            and isinstance(completed_at, int | float)
        ):
            delay = max(0.0, job.ended_at - completed_at)
            latencies.setdefault("all jobs", []).append(delay)
            if job.ended_by is not None:
                latencies.setdefault(f"by {job.ended_by.value}", []).append(delay)
    add("")
    add("KIE's completion to kied's record")
    add(_latency_row("all jobs", latencies.pop("all jobs", [])))
    for key in sorted(latencies):
        add(_latency_row("  " + key, latencies[key]))
    return "\n".join(out)


_LABEL: Final = 28
_VALUE: Final = 6


def _row(label: str, value: int, note: str = "") -> str:
    return f"  {label:<{_LABEL}}{value:>{_VALUE}}" + (f"   {note}" if note else "")


def _latency_row(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label:<{_LABEL}}{'-':>{_VALUE}}"
    return (
        f"  {label:<{_LABEL}}{len(values):>{_VALUE}}   "
        f"p50 {_duration_text(_percentile(values, 0.50))}, "
        f"p99 {_duration_text(_percentile(values, 0.99))}"
    )


def _percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def _duration_text(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _sum(tasks: Mapping[str, Mapping[str, Any]], key: str) -> int:
    return sum(int(t.get(key) or 0) for t in tasks.values())


def _repeats(callbacks: Sequence[StoredCallback]) -> int:
    seen: set[tuple[str | None, bytes]] = set()
    repeats = 0
    for c in callbacks:
        key = (c.entry.task_id, c.entry.body)
        if key in seen:
            repeats += 1
        seen.add(key)
    return repeats


def _range(duration_s: tuple[float, float]) -> str:
    low, high = duration_s
    return f"{low:g} s" if low == high else f"{low:g}-{high:g} s"


def _describe_mix(options: DemoOptions) -> str:
    rates = ", ".join(
        f"{name.replace('_', ' ')} {value:g}" for name, value in options.faults().items() if value
    )
    preset = dict(MIXES[options.mix])
    same = all(preset.get(name, 0.0) == value for name, value in options.faults().items())
    name = options.mix if same else f"{options.mix} (adjusted)"
    return f"{name}: {rates}" if rates else name


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
