"""Pollers under load: how fast a callback stops its poller, how many status queries a job
costs, and what tracking 10,000 or 100,000 unfinished jobs at once costs.

    python bench/pollers.py [--parts wakeup,queries,scale] [options, see --help]

Everything runs in one process: kied's ``Daemon`` (its callback and jobs services, the poller
supervisor and KIE's client) against kied's own KIE simulator, reached through
``httpx.ASGITransport``. The simulator's callbacks are handed to kied in-process: straight to
``daemon.callbacks.handle`` (``service``), or through kied's own HTTP app over an ASGI
transport (``app``). For the length of a run the benchmark wraps ``PollerSupervisor._poll``
(to count pollers and time their exit) and ``RateLimiter.acquire`` (to see status queries
wait and pass); kied itself runs unmodified.

wakeup   Real clock. N jobs track simulator tasks that stay pending until the benchmark
         finishes them, one every --wakeup-spacing-ms, once every poller runs. The latency is
         from just before a terminal callback is handed to kied to the moment that job's
         poller task has left its cancel scope. SQLite (a file in a temporary directory, so
         the durable write is included) and MemoryStore.
queries  Virtual time (trio's MockClock, autojump). Jobs arrive every --queries-arrival-s and
         take --queries-duration seconds; status queries per job as the simulator counted
         them, with callbacks delivered and with all dropped, for kied (jobs submitted
         through the jobs service, kied creating the tasks) and for a fixed 3-second poller
         that ignores callbacks (the same KIE client; first query 3 s after creation).
scale    Real clock, one child process per size and store. N overdue jobs tracking stuck
         simulator tasks are put straight into the store (``create_job`` with the task id)
         and the simulator (``Simulator.create_task``), without HTTP, with a listening span
         that leaves no gap; then the poller supervisor takes them over, one poller per job,
         each planned within the status-query budget (8/s) and sleeping until its query. VmRSS at each step; CPU seconds / wall seconds
         per slice and over a steady window that starts --scale-settle-s after every poller
         sleeps on its plan or waits its turn; status queries per second as the simulator saw them
         and as the limiter granted them; how late a task sleeping 50 ms wakes (event loop
         lag); and the cyclic garbage collector's pauses. The in-process simulator's tasks
         count in RSS and its answers in CPU.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import trio
import trio.testing
from _common import PYTHON, compile_project

from kied.core.callbacks import Outcome
from kied.core.families import Family
from kied.core.jobs import TERMINAL_STATES, Job, JobId, NewJob, TaskId
from kied.daemon import Daemon
from kied.kie._ratelimit import RateLimiter
from kied.kie.client import KieClientSettings, open_kie_client
from kied.kie.simulator import Family as SimFamily
from kied.kie.simulator import Simulator, SimulatorConfig, TaskOverrides
from kied.kie.simulator import create_app as create_sim_app
from kied.pollers import PollerSupervisor
from kied.settings import NoLockSettings, Settings, SqliteStoreSettings
from kied.store import JobStore, SqliteStore
from kied.testing import MemoryStore, raw_callback
from kied.web import create_app as create_kied_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence

WALL0 = 1_767_225_600.0
API = "http://kie.test"
PUBLIC = "http://kied.test"
MODEL = "google/nano-banana"
STUCK = TaskOverrides(outcome="stuck")

Via = Literal["service", "app", "discard"]


def _wall() -> float:
    # Stored times follow trio's clock, so virtual-time runs and real-time runs read alike.
    return WALL0 + trio.current_time()


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return math.nan


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank."""
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def _dist(values: Sequence[float], *, scale: float = 1.0, digits: int = 3) -> dict[str, float]:
    ordered = sorted(v * scale for v in values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "mean": round(statistics.fmean(ordered), digits),
        "p50": round(_quantile(ordered, 0.5), digits),
        "p99": round(_quantile(ordered, 0.99), digits),
        "max": round(ordered[-1], digits),
    }


# -- the stack ---------------------------------------------------------------------------


@dataclass
class _Pollers:
    """What the wrapped pollers did."""

    started: int = 0
    #: job id -> perf_counter() when its poller task had left its cancel scope
    exited: dict[JobId, float] = field(default_factory=dict)
    #: tasks that have asked for a status query (waited at the rate limiter)
    asking: set[int] = field(default_factory=set)
    #: trio times at which the status-query rate limiter let a query through
    grants: list[float] = field(default_factory=list)

    #: pollers waiting for one of the supervisor's query slots (set once it runs)
    waiting_for_slot: Callable[[], int] = lambda: 0

    _changed: trio.Event | None = None

    @property
    def running(self) -> int:
        return self.started - len(self.exited)

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_until(self, condition: Callable[[_Pollers], bool], *, within_s: float) -> None:
        with trio.fail_after(within_s):
            while not condition(self):
                if self._changed is None:
                    self._changed = trio.Event()
                await self._changed.wait()


@contextmanager
def _watch_pollers(watch: _Pollers) -> Iterator[None]:
    """Count pollers, and time when each ends, for as long as the block runs."""
    original = PollerSupervisor._poll

    async def poll(self: PollerSupervisor, job: Job, scope: trio.CancelScope, *args: Any) -> None:
        watch.started += 1
        watch.notify()
        try:
            await original(self, job, scope, *args)
        finally:
            # _poll has left the scope and dropped its registry entry: nothing of the
            # poller is left to run.
            watch.exited[job.id] = time.perf_counter()
            watch.notify()

    PollerSupervisor._poll = poll  # type: ignore[method-assign]
    try:
        yield
    finally:
        PollerSupervisor._poll = original  # type: ignore[method-assign]


@contextmanager
def _watch_grants(watch: _Pollers) -> Iterator[None]:
    """Record which tasks asked KIE's client for a status query, and when the status-query
    rate limiter let each one through (the limiter's own timestamp)."""
    original = RateLimiter.acquire
    status_limit = KieClientSettings(base_url=API, api_key=None).status_limit

    async def acquire(self: RateLimiter) -> None:
        if (self.limit, self.window_s) != status_limit:
            await original(self)
            return
        watch.asking.add(id(trio.lowlevel.current_task()))
        watch.notify()
        await original(self)
        watch.grants.append(self._grants[-1])

    RateLimiter.acquire = acquire  # type: ignore[method-assign]
    try:
        yield
    finally:
        RateLimiter.acquire = original  # type: ignore[method-assign]


@dataclass
class _Stack:
    daemon: Daemon
    sim: Simulator
    store: JobStore
    nursery: trio.Nursery
    #: task id -> perf_counter() just before its first callback was handed to kied
    delivered: dict[str, float]
    #: task id -> perf_counter() once kied had answered that callback
    answered: dict[str, float]

    def lead(self) -> None:
        """Start the leader's work (KIE's client and the poller supervisor), as when ACTIVE."""
        self.nursery.start_soon(self.daemon.run_pollers, self.store)

    def new_task(self, *, overrides: TaskOverrides | None = None) -> str:
        """Create a Market task on the simulator directly, with a callback URL; its id."""
        body = json.dumps(
            {"model": MODEL, "callBackUrl": f"{PUBLIC}/callbacks/kie", "input": {"prompt": "x"}}
        ).encode()
        reply = self.sim.create_task(
            SimFamily.MARKET, body, authorization="Bearer bench", overrides=overrides
        )
        task_id: str = json.loads(reply.body)["data"]["taskId"]
        return task_id


def _settings() -> Settings:
    # The store is handed to the daemon; the path here is never opened.
    return Settings(
        store=SqliteStoreSettings(path=Path("unused.db")),
        lock=NoLockSettings(),
        public_url=PUBLIC,
        kie_base_url=API,
        kie_api_key="bench-key",
    )


def _task_id_of(body: bytes) -> str:
    try:
        data = json.loads(body)["data"]
        return str(data.get("taskId") or data.get("task_id"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


@asynccontextmanager
async def _open_stack(
    config: SimulatorConfig, store: JobStore, *, via: Via
) -> AsyncIterator[_Stack]:
    """kied's daemon and the simulator in one process; the simulator's callbacks go ``via``."""
    settings = _settings()
    delivered: dict[str, float] = {}
    answered: dict[str, float] = {}
    parts: dict[str, Any] = {}

    async def deliver(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        task_id = _task_id_of(body)
        if via == "discard":
            return httpx.Response(200, json={"status": "received"})
        t0 = time.perf_counter()
        delivered.setdefault(task_id, t0)
        if via == "app":
            response: httpx.Response = await parts["kied_app"].handle_async_request(request)
            await response.aread()
        else:
            await parts["daemon"].callbacks.handle(await raw_callback(request))
            response = httpx.Response(200, json={"status": "received"})
        answered.setdefault(task_id, time.perf_counter())
        return response

    async with httpx.AsyncClient(transport=httpx.MockTransport(deliver)) as hooks:
        sim = Simulator(config, client=hooks, now=_wall, base_url=API)
        sim_app = create_sim_app(sim)
        daemon = Daemon(
            settings,
            now=_wall,
            kie_transport=httpx.ASGITransport(app=sim_app),  # type: ignore[arg-type]
            store=store,
        )
        parts["daemon"] = daemon
        kied_app = create_kied_app(
            callbacks=daemon.callbacks, jobs=daemon.jobs, status=daemon, settings=settings
        )
        parts["kied_app"] = httpx.ASGITransport(app=kied_app)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            yield _Stack(
                daemon=daemon,
                sim=sim,
                store=store,
                nursery=nursery,
                delivered=delivered,
                answered=answered,
            )
            nursery.cancel_scope.cancel()


async def _open_store(kind: str, directory: Path, name: str) -> JobStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return await SqliteStore.connect(directory / f"{name}.db")
    raise ValueError(f"unknown store {kind!r}")


# -- (a) wake-up latency -----------------------------------------------------------------


async def _wakeup(
    store_kind: str, via: Via, n: int, spacing_s: float, directory: Path
) -> dict[str, Any]:
    store = await _open_store(store_kind, directory, f"wakeup-{via}")
    watch = _Pollers()
    try:
        with _watch_pollers(watch):
            async with _open_stack(SimulatorConfig(seed=1), store, via=via) as stack:
                task_ids = [stack.new_task(overrides=STUCK) for _ in range(n)]
                job_of: dict[str, JobId] = {}
                for task_id in task_ids:
                    job, _ = await stack.daemon.jobs.submit(
                        {"task_id": task_id, "family": "market", "model": MODEL}
                    )
                    job_of[task_id] = job.id
                stack.lead()
                await watch.wait_until(lambda w: w.started >= n, within_s=60)
                # Every poller is now asleep until its first status query (60 s or more
                # away: callbacks are presumed to work). Let them all get there.
                await trio.sleep(0.2)
                began = time.perf_counter()
                for task_id in task_ids:
                    stack.sim.complete_task(task_id)
                    await trio.sleep(spacing_s)
                await watch.wait_until(lambda w: w.running == 0, within_s=60)
                took = time.perf_counter() - began
                ended_by: Counter[str] = Counter()
                for job_id in job_of.values():
                    job = await store.get_job(job_id)
                    ended_by[job.ended_by.value if job and job.ended_by else "not ended"] += 1
                totals = stack.sim.stats()["totals"]
                latencies = [watch.exited[job_of[t]] - stack.delivered[t] for t in task_ids]
                answers = [stack.answered[t] - stack.delivered[t] for t in task_ids]
    finally:
        await store.aclose()
    return {
        "store": store_kind,
        "callbacks_via": via,
        "spacing_ms": spacing_s * 1000,
        "callback_to_poller_exit_ms": _dist(latencies, scale=1000),
        "callback_answered_ms": _dist(answers, scale=1000),
        "ended_by": dict(ended_by),
        "status_queries": totals["status_queries"],
        "run_s": round(took, 2),
    }


# -- (b) status queries per job ----------------------------------------------------------


@dataclass
class _JobRow:
    created_t: float
    #: when the task reached success or fail (trio time)
    completed_t: float
    queries: int
    duration_s: float
    #: from the task's completion to the job's terminal state, as stored
    lag_s: float
    ended_by: str


async def _queries_kied(config: SimulatorConfig, n: int, arrival_s: float) -> list[_JobRow]:
    store = MemoryStore()
    async with _open_stack(config, store, via="service") as stack:
        stack.lead()
        job_ids: list[JobId] = []
        for i in range(n):
            job, _ = await stack.daemon.jobs.submit({"model": MODEL, "input": {"prompt": str(i)}})
            job_ids.append(job.id)
            await trio.sleep(arrival_s)
        for job_id in job_ids:
            with trio.fail_after(3600):
                while True:
                    job = await stack.daemon.jobs.wait(job_id, 300)
                    if job is not None and job.state in TERMINAL_STATES:
                        break
        tasks = stack.sim.stats()["tasks"]
        rows = []
        for job_id in job_ids:
            job = await store.get_job(job_id)
            assert job is not None
            assert job.task_id is not None
            assert job.ended_at is not None
            task = tasks[job.task_id]
            rows.append(
                _JobRow(
                    created_t=job.created_at - WALL0,
                    completed_t=task["completed_at"] - WALL0,
                    queries=task["status_queries"],
                    duration_s=task["duration_s"],
                    lag_s=job.ended_at - task["completed_at"],
                    ended_by=job.ended_by.value if job.ended_by else "?",
                )
            )
    return rows


async def _queries_fixed(
    config: SimulatorConfig, n: int, arrival_s: float, interval_s: float
) -> list[_JobRow]:
    """The poller kied replaces: a status query every ``interval_s`` from the task's
    creation until it is terminal; callbacks are ignored."""
    rows: dict[int, _JobRow] = {}
    async with _open_stack(config, MemoryStore(), via="discard") as stack:
        client_settings = KieClientSettings(base_url=API, api_key="bench-key")
        transport = httpx.ASGITransport(app=create_sim_app(stack.sim))  # type: ignore[arg-type]
        async with open_kie_client(client_settings, transport=transport) as kie:

            async def poll(i: int) -> None:
                task_id = await kie.create_task(
                    Family.MARKET,
                    model=MODEL,
                    input={"prompt": str(i)},
                    callback_url=f"{PUBLIC}/callbacks/kie",
                )
                created_t = trio.current_time()
                tick = 0
                while True:
                    tick += 1
                    await trio.sleep_until(created_t + tick * interval_s)
                    status = await kie.get_status(Family.MARKET, task_id)
                    reading = status.reading
                    if reading is not None and reading.outcome in (Outcome.SUCCESS, Outcome.FAIL):
                        break
                ended_at = _wall()
                task = stack.sim.stats(task_id)["tasks"][task_id]
                rows[i] = _JobRow(
                    created_t=created_t,
                    completed_t=task["completed_at"] - WALL0,
                    queries=task["status_queries"],
                    duration_s=task["duration_s"],
                    lag_s=ended_at - task["completed_at"],
                    ended_by="poll",
                )

            async with trio.open_nursery() as pollers:
                for i in range(n):
                    pollers.start_soon(poll, i)
                    await trio.sleep(arrival_s)
    return [rows[i] for i in range(n)]


def _by_typical_duration(rows: list[_JobRow]) -> dict[str, Any]:
    """Queries of jobs created before and after kied could know a typical duration.

    kied learns how long jobs of a model take from jobs that callbacks finished, once three
    have (``CallbackHealth``'s ``min_samples`` default); until then a job's first query
    waits the overdue floor (60 s).
    """
    by_callback = sorted(r.completed_t for r in rows if r.ended_by == "callback")
    if len(by_callback) < 3:
        return {}
    known_t = by_callback[2]
    before = [r.queries for r in rows if r.created_t < known_t]
    after = [r.queries for r in rows if r.created_t >= known_t]
    return {
        "typical_duration_known_at_s": round(known_t, 1),
        "queries_per_job_created_before_that": _dist(before, digits=2),
        "queries_per_job_created_after_that": _dist(after, digits=2),
    }


def _queries_cell(
    poller: str,
    *,
    callbacks: bool,
    n: int,
    arrival_s: float,
    duration: tuple[float, float],
    seed: int,
) -> dict[str, Any]:
    config = SimulatorConfig(
        duration_s=duration, seed=seed, drop_callbacks=0.0 if callbacks else 1.0
    )
    run = (
        partial(_queries_kied, config, n, arrival_s)
        if poller == "kied"
        else partial(_queries_fixed, config, n, arrival_s, 3.0)
    )
    clock = trio.testing.MockClock(autojump_threshold=0)
    began = time.perf_counter()
    rows: list[_JobRow] = trio.run(run, clock=clock)
    took = time.perf_counter() - began
    queries = [r.queries for r in rows]
    quarter = max(len(rows) // 4, 1)
    return {
        "status_queries_per_job": _dist(queries, digits=2),
        "jobs_with_more_than_one_query": sum(q > 1 for q in queries),
        "mean_queries_by_quarter_of_arrivals": [
            round(statistics.fmean(queries[i : i + quarter]), 2)
            for i in range(0, len(queries), quarter)
        ],
        "completion_to_terminal_s": _dist([r.lag_s for r in rows], digits=2),
        "ended_by": dict(Counter(r.ended_by for r in rows)),
        **_by_typical_duration(rows),
        "virtual_s": round(clock.current_time(), 1),
        "wall_s": round(took, 2),
    }


# -- (c) many pollers at once ------------------------------------------------------------


async def _probe_lag(lags: list[tuple[float, float]], period_s: float) -> None:
    while True:
        t0 = time.perf_counter()
        await trio.sleep(period_s)
        lags.append((t0, time.perf_counter() - t0 - period_s))


@contextmanager
def _watch_gc(pauses: list[tuple[float, float, int]]) -> Iterator[None]:
    """Record each cyclic garbage collection: (start, seconds, generation)."""
    began: list[float] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began.append(time.perf_counter())
        elif began:
            t0 = began.pop()
            pauses.append((t0, time.perf_counter() - t0, info["generation"]))

    gc.callbacks.append(note)
    try:
        yield
    finally:
        gc.callbacks.remove(note)


def _gc_summary(pauses: Sequence[tuple[float, float, int]]) -> dict[str, Any]:
    full = [seconds for _, seconds, generation in pauses if generation == 2]
    return {
        "collections": len(pauses),
        "seconds": round(sum(seconds for _, seconds, _ in pauses), 2),
        "full_collections": len(full),
        "longest_full_s": round(max(full), 3) if full else None,
    }


def _max_per_window(times: Sequence[float], window_s: float) -> int:
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _scale(
    n: int, store_kind: str, window_s: float, settle_s: float, slice_s: float, directory: Path
) -> dict[str, Any]:
    rss = {"start": _rss_mib()}
    store = await _open_store(store_kind, directory, f"scale-{n}")
    watch = _Pollers()
    query_times: list[float] = []
    gc_pauses: list[tuple[float, float, int]] = []
    try:
        with _watch_pollers(watch), _watch_grants(watch), _watch_gc(gc_pauses):
            async with _open_stack(SimulatorConfig(seed=1), store, via="service") as stack:
                answer = stack.sim.query_task

                def counted(*args: Any, **kwargs: Any) -> Any:
                    query_times.append(trio.current_time())
                    return answer(*args, **kwargs)

                stack.sim.query_task = counted  # type: ignore[method-assign]

                # Populate: stuck simulator tasks, and jobs created 10 minutes ago (so
                # overdue and on the slowest poll step) that track them.
                began, cpu = time.perf_counter(), time.process_time()
                now = _wall()
                task_ids = [stack.new_task(overrides=STUCK) for _ in range(n)]
                sim_s = time.perf_counter() - began
                rss["simulator_tasks_created"] = _rss_mib()
                for task_id in task_ids:
                    await store.create_job(
                        NewJob(
                            id=JobId(uuid.uuid4().hex),
                            family="market",
                            model=MODEL,
                            task_id=TaskId(task_id),
                            request=None,
                            metadata=None,
                            idempotency_key=None,
                            created_at=now - 600.0,
                            deadline_at=now + 86_400.0,
                        )
                    )
                del task_ids
                # Another instance listened throughout (a deploy without a gap): the jobs
                # are taken over on their schedule, not queried first as a catch-up.
                await store.heard_listening("previous", since=now - 3600.0, now=now + 3600.0)
                populate = {
                    "simulator_s": round(sim_s, 2),
                    "store_s": round(time.perf_counter() - began - sim_s, 2),
                    "cpu_s": round(time.process_time() - cpu, 2),
                }
                rss["jobs_stored"] = _rss_mib()

                lags: list[tuple[float, float]] = []
                stack.nursery.start_soon(_probe_lag, lags, 0.05)
                await trio.sleep(0.5)
                began, cpu = time.perf_counter(), time.process_time()
                lead_t = trio.current_time()
                stack.lead()

                def slot_waiters() -> int:
                    # Sleeping until its planned query, or waiting for the budget or a slot.
                    supervisor = stack.daemon._supervisor
                    if supervisor is None:
                        return 0
                    return (
                        len(supervisor._sleeping)
                        + supervisor._query_slots.statistics().tasks_waiting
                    )

                watch.waiting_for_slot = slot_waiters
                await watch.wait_until(lambda w: w.started >= n, within_s=600)
                start: dict[str, float] = {
                    "all_pollers_started_s": round(time.perf_counter() - began, 2),
                    "cpu_s": round(time.process_time() - cpu, 2),
                }
                rss["pollers_started"] = _rss_mib()

                queued: list[float] = []

                async def note_queued() -> None:
                    # Every poller waits its turn for a status query (kied lets a few at a
                    # time read storage and ask KIE) or has had it: the start-up wave is over.
                    await watch.wait_until(
                        lambda w: len(w.asking) + w.waiting_for_slot() >= n, within_s=3600
                    )
                    queued.append(time.perf_counter())
                    rss["pollers_queued"] = _rss_mib()

                stack.nursery.start_soon(note_queued)

                # CPU and queries per slice: until every poller is queued, a settling
                # period, then the measured window.
                slices = []
                steady: list[tuple[float, float, int]] = []
                t_started = time.perf_counter()
                window_from = math.inf
                for phase in ("queueing", "settle", "window"):
                    if phase == "queueing":
                        phase_end = math.inf
                    else:
                        length = settle_s if phase == "settle" else window_s
                        phase_end = time.perf_counter() + length
                        if phase == "window":
                            window_from = time.perf_counter()
                    while (t0 := time.perf_counter()) < phase_end - 1e-3:
                        if phase == "queueing" and queued:
                            break
                        c0, q0 = time.process_time(), len(query_times)
                        await trio.sleep(min(slice_s, phase_end - t0))
                        wall = time.perf_counter() - t0
                        cpu_used = time.process_time() - c0
                        queries = len(query_times) - q0
                        slices.append(
                            {
                                "phase": phase,
                                "from_s": round(t0 - t_started, 1),
                                "cpu_share": round(cpu_used / wall, 3),
                                "queries_per_s": round(queries / wall, 2),
                            }
                        )
                        if phase == "window":
                            steady.append((wall, cpu_used, queries))
                window_to = time.perf_counter()
                rss["end_of_window"] = _rss_mib()
                running = watch.running
                first_query_s = next((t - lead_t for t in query_times if t >= lead_t), math.nan)
    finally:
        await store.aclose()
    wall = sum(w for w, _, _ in steady)
    cpu_used = sum(c for _, c, _ in steady)
    queries = sum(q for _, _, q in steady)
    return {
        "jobs": n,
        "store": store_kind,
        "pollers_running": running,
        "populate": populate,
        "start": start
        | {
            "all_pollers_queued_s": round(queued[0] - began, 2),
            "first_status_query_s": round(first_query_s, 2),
        },
        # how late a task sleeping 50 ms at a time wakes: how long the event loop (and so
        # every callback and API request) can be kept waiting
        "event_loop_lag_ms": {
            "while_starting": _dist(
                [lag for t, lag in lags if began <= t < window_from], scale=1000, digits=1
            ),
            "steady_window": _dist(
                [lag for t, lag in lags if window_from <= t < window_to], scale=1000, digits=1
            ),
        },
        # Python's cyclic garbage collector, from the lead to the window, and in the window
        "gc_while_starting": _gc_summary([p for p in gc_pauses if began <= p[0] < window_from]),
        "gc_steady_window": _gc_summary([p for p in gc_pauses if window_from <= p[0] < window_to]),
        "rss_mib": rss,
        "rss_for_pollers_mib": round(rss["end_of_window"] - rss["jobs_stored"], 1),
        "rss_per_poller_kib": round((rss["end_of_window"] - rss["jobs_stored"]) * 1024 / n, 2),
        "steady_window_s": round(wall, 1),
        "cpu_share": round(cpu_used / wall, 3) if wall else None,
        "status_queries_per_s": round(queries / wall, 2) if wall else None,
        # as the simulator saw them, and as kied's rate limiter granted them
        "max_status_queries_in_any_1s": _max_per_window(query_times, 1.0),
        "max_status_grants_in_any_1s": _max_per_window(watch.grants, 1.0),
        "max_status_queries_in_any_10s": _max_per_window(query_times, 10.0),
        "max_status_grants_in_any_10s": _max_per_window(watch.grants, 10.0),
        # the k-th query the simulator saw, less the k-th grant: the time in between
        "grant_to_simulator_ms": _dist(
            [q - g for q, g in zip(sorted(query_times), sorted(watch.grants), strict=False)],
            scale=1000,
            digits=2,
        ),
        "slices": slices,
    }


def _scale_in_child(n: int, store_kind: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        PYTHON,
        __file__,
        "--scale-child",
        f"{n}:{store_kind}",
        "--scale-window-s",
        str(args.scale_window_s),
        "--scale-settle-s",
        str(args.scale_settle_s),
        "--scale-slice-s",
        str(args.scale_slice_s),
    ]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"jobs": n, "store": store_kind, "error": done.stderr.strip().splitlines()[-5:]}
    result: dict[str, Any] = json.loads(done.stdout)
    result["child_wall_s"] = round(time.perf_counter() - began, 1)
    return result


# -- the command -------------------------------------------------------------------------


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--parts", default="wakeup,queries,scale", help="which parts to run (default: all three)"
    )
    a = p.add_argument_group("wakeup (real clock)")
    a.add_argument("--wakeup-jobs", type=int, default=300, help="jobs per run (default: 300)")
    a.add_argument(
        "--wakeup-spacing-ms",
        type=float,
        default=5.0,
        help="time between two tasks finishing (default: 5); 0 finishes them all at once",
    )
    a.add_argument("--wakeup-stores", default="sqlite,memory", help="default: sqlite,memory")
    a.add_argument(
        "--wakeup-via",
        default="service,app",
        help="how callbacks reach kied: service (daemon.callbacks.handle) and/or app "
        "(kied's HTTP app over an ASGI transport) (default: service,app)",
    )
    b = p.add_argument_group("queries (virtual time)")
    b.add_argument("--queries-jobs", type=int, default=200, help="jobs per cell (default: 200)")
    b.add_argument(
        "--queries-arrival-s", type=float, default=10.0, help="time between jobs (default: 10)"
    )
    b.add_argument(
        "--queries-duration",
        default="60-300",
        metavar="MIN-MAX",
        help="task durations, uniform in seconds (default: 60-300)",
    )
    b.add_argument("--seed", type=int, default=1, help="simulator seed (default: 1)")
    c = p.add_argument_group("scale (real clock, one child process per size and store)")
    c.add_argument(
        "--scale-jobs", default="10000,100000", help="sizes to run (default: 10000,100000)"
    )
    c.add_argument(
        "--scale-stores", default="memory,sqlite", help="memory and/or sqlite (default: both)"
    )
    c.add_argument(
        "--scale-window-s", type=float, default=30.0, help="steady window measured (default: 30)"
    )
    c.add_argument(
        "--scale-settle-s",
        type=float,
        default=10.0,
        help="wait after every poller sleeps on its plan or waits its turn, before the window "
        "(default: 10)",
    )
    c.add_argument(
        "--scale-slice-s",
        type=float,
        default=5.0,
        help="CPU is also reported per slice (default: 5)",
    )
    c.add_argument("--scale-child", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = _parser().parse_args()
    if args.scale_child:
        size, _, store_kind = args.scale_child.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            result = trio.run(
                _scale,
                int(size),
                store_kind,
                args.scale_window_s,
                args.scale_settle_s,
                args.scale_slice_s,
                Path(tmp),
            )
        print(json.dumps(result))
        return

    compile_project()
    parts = _list(args.parts)
    report: dict[str, Any] = {}
    if "wakeup" in parts:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for store_kind in _list(args.wakeup_stores):
                for via in _list(args.wakeup_via):
                    runs.append(
                        trio.run(
                            _wakeup,
                            store_kind,
                            via,
                            args.wakeup_jobs,
                            args.wakeup_spacing_ms / 1000,
                            Path(tmp),
                        )
                    )
        report["wakeup"] = runs
    if "queries" in parts:
        low, _, high = args.queries_duration.partition("-")
        duration = (float(low), float(high or low))
        report["queries"] = {
            f"{poller}, callbacks {'arrive' if callbacks else 'dropped'}": _queries_cell(
                poller,
                callbacks=callbacks,
                n=args.queries_jobs,
                arrival_s=args.queries_arrival_s,
                duration=duration,
                seed=args.seed,
            )
            for callbacks in (True, False)
            for poller in ("kied", "fixed 3 s")
        }
    if "scale" in parts:
        report["scale"] = [
            _scale_in_child(int(size), store_kind, args)
            for store_kind in _list(args.scale_stores)
            for size in _list(args.scale_jobs)
        ]
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
