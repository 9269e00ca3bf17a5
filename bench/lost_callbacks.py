"""Lost callbacks: how soon kied learns the truth when callbacks do not come, what it spends
on status queries, and what a restart costs.

    python bench/lost_callbacks.py --part a|b|c|d [--sizes 10,100,1000] [options, --help]

Real processes: ``kied serve`` (SQLite in a temporary directory, a public URL on loopback so
that callbacks are expected) and ``kied simulate``. The benchmark creates the tasks itself,
straight at the simulator (its own ``callBackUrl`` carries kied's callback token), and hands
each to kied as a tracked job (``POST /v1/jobs {"task_id": ...}``): KIE lets a key create 20
tasks per 10 s, which would take longer than the runs themselves at 1,000 jobs. Every job's
end is compared with its task's (``/_sim/stats``: ``completed_at``), counted from the later
of the task's end and the job's creation.

a  Callbacks all dropped, a fresh daemon, N jobs in flight at once: time from a task's end
   to its job's end (p50/p99/max), status queries a second (the simulator's total over the
   run; the highest ``kied_status_query_rate_per_s`` seen on /metrics, a 10-s window).
b  Callbacks working, the same sizes: status queries per job, and the same times.
c  The daemon stopped (SIGTERM) for --down-s while N tasks (default 50) end, then started
   again on the same database: time from the start (exec) to every job ended, and to
   the first status query.
d  SIGTERM exit time with idle keep-alive connections: bench/shutdown.py, when present.

Prints one JSON object per part.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.procs import free_port, kied, read_url, stop  # noqa: E402

if TYPE_CHECKING:
    import subprocess

TOKEN = "bench-callback-token"
API_TOKEN = "bench-api-token"
MODEL = "google/nano-banana"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def parse_iso(text: str | None) -> float | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Simulator:
    def __init__(self, *, duration: str, drop: float, seed: int = 1) -> None:
        self.proc = kied(
            "simulate",
            "--port",
            "0",
            "--duration",
            duration,
            "--drop-callbacks",
            str(drop),
            "--seed",
            str(seed),
        )
        self.url = read_url(self.proc)
        # Its log is not read from here on: drain it so that the pipe never fills (a full
        # pipe blocks the simulator's next log line, and with it the whole simulator).
        subprocess_drain(self.proc)

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_sim/stats", timeout=30).json()["tasks"])

    def close(self) -> None:
        stop(self.proc)


class Daemon:
    def __init__(self, sim: Simulator, db_dir: Path, *, budget: float | None, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        env = {
            "KIED_DATABASE_URL": str(db_dir / "kied.db"),
            "KIE_BASE_URL": sim.url,
            "KIE_API_KEY": "bench",
            "KIED_PUBLIC_URL": self.url,
            "KIED_CALLBACK_TOKEN": TOKEN,
            "KIED_API_TOKEN": API_TOKEN,
            "KIED_LOG_LEVEL": "INFO",
            # Result files are not what is measured here (the simulator's are on loopback,
            # which the archive refuses anyway).
            "KIED_ARCHIVE": "none",
        }
        if budget is not None:
            env["KIED_STATUS_QUERIES_PER_S"] = str(budget)
        self.started_at = time.time()
        self.proc = kied("serve", "--port", str(port), env=env)
        read_url(self.proc, within_s=30)
        # The log is not read from here on: drain it so that the pipe never fills.
        subprocess_drain(self.proc)

    def active(self) -> bool:
        try:
            return bool(httpx.get(f"{self.url}/healthz", timeout=2).json()["mode"] == "ACTIVE")
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def query_rate(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("kied_status_query_rate_per_s "):
                return float(line.split()[1])
        return 0.0

    def unfinished(self) -> int:
        r = httpx.get(
            f"{self.url}/v1/jobs",
            params={"state": "submitting,pending", "limit": 1000},
            headers=AUTH,
            timeout=30,
        )
        return len(r.json()["jobs"])

    def jobs(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/v1/jobs", params={"limit": 1000}, headers=AUTH, timeout=30)
        return list(r.json()["jobs"])

    def close(self) -> None:
        stop(self.proc, within_s=30)


def subprocess_drain(proc: subprocess.Popen[str]) -> None:
    def drain(pipe: Any) -> None:
        for _ in pipe:
            pass

    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            threading.Thread(target=drain, args=(pipe,), daemon=True).start()


async def create_and_track(sim: Simulator, daemon: Daemon, count: int) -> dict[str, float]:
    """Create ``count`` tasks at the simulator and hand each to kied; task id -> the time
    kied's job was created (wall clock)."""
    tracked: dict[str, float] = {}
    callback = f"{daemon.url}/callbacks/kie?token={TOKEN}"
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with gate:
                r = await client.post(
                    f"{sim.url}/api/v1/jobs/createTask",
                    json={"model": MODEL, "input": {"prompt": f"p{i}"}, "callBackUrl": callback},
                    headers={"Authorization": "Bearer bench"},
                )
                task_id = r.json()["data"]["taskId"]
                r = await client.post(
                    f"{daemon.url}/v1/jobs",
                    json={"task_id": task_id, "model": MODEL},
                    headers=AUTH,
                )
                r.raise_for_status()
                tracked[task_id] = parse_iso(r.json()["created_at"]) or time.time()

        await asyncio.gather(*(one(i) for i in range(count)))
    return tracked


def wait_all_ended(daemon: Daemon, *, within_s: float, sample: list[float]) -> float:
    """Wait until kied has no unfinished job; the wall time it took. Samples /metrics."""
    t0 = time.time()
    while time.time() - t0 < within_s:
        sample.append(daemon.query_rate())
        if daemon.unfinished() == 0:
            return time.time() - t0
        time.sleep(1.0)
    raise RuntimeError(f"jobs still unfinished after {within_s} s")


def lateness(
    daemon: Daemon, sim: Simulator, tracked: dict[str, float]
) -> tuple[list[float], dict[str, Any]]:
    stats = sim.stats()
    late: list[float] = []
    for job in daemon.jobs():
        task_id = job.get("task_id")
        if task_id not in tracked:
            continue
        ended = parse_iso(job["ended_at"])
        completed = stats[task_id]["completed_at"]
        if ended is None or completed is None:
            continue
        late.append(ended - max(completed, tracked[task_id]))
    return late, stats


def run_size(
    size: int, *, drop: float, duration: str, budget: float | None, within_s: float
) -> dict[str, Any]:
    sim = Simulator(duration=duration, drop=drop)
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(sim, Path(tmp), budget=budget, port=free_port())
        try:
            deadline = time.time() + 30
            while not daemon.active() and time.time() < deadline:
                time.sleep(0.05)
            t0 = time.time()
            tracked = asyncio.run(create_and_track(sim, daemon, size))
            created_s = time.time() - t0
            rates: list[float] = []
            wait_all_ended(daemon, within_s=within_s, sample=rates)
            run_s = time.time() - t0
            late, stats = lateness(daemon, sim, tracked)
        finally:
            daemon.close()
            sim.close()
    queries = [stats[t]["status_queries"] for t in tracked]
    return {
        "jobs": size,
        "tasks_s": duration,
        "tracked_in_s": round(created_s, 2),
        "all_ended_after_s": round(run_s, 1),
        "late_s": {
            "p50": round(statistics.median(late), 2),
            "p99": round(quantile(late, 0.99), 2),
            "max": round(max(late), 2),
            "n": len(late),
        },
        "status_queries": sum(queries),
        "queries_per_job": round(sum(queries) / size, 2),
        "queries_per_s_over_run": round(sum(queries) / run_s, 2),
        "max_query_rate_10s": round(max(rates, default=0.0), 2),
    }


def part_ab(args: argparse.Namespace, *, drop: float) -> dict[str, Any]:
    results = []
    for size in args.sizes:
        duration = args.duration_large if size >= 1000 else args.duration
        results.append(
            run_size(size, drop=drop, duration=duration, budget=args.budget, within_s=args.within_s)
        )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return {
        "part": "a" if drop else "b",
        "callbacks": "dropped" if drop else "working",
        "budget": args.budget or 8.0,
        "runs": results,
    }


def part_c(args: argparse.Namespace) -> dict[str, Any]:
    # Tasks end --down-s/2 .. --down-s after the stop; nobody hears their callbacks (the
    # simulator drops them: a callback to a closed port is lost just the same).
    sim = Simulator(duration=f"{args.down_s / 2:g}-{args.down_s - 2:g}", drop=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        first = Daemon(sim, Path(tmp), budget=args.budget, port=port)
        while not first.active():
            time.sleep(0.05)
        tracked = asyncio.run(create_and_track(sim, first, args.restart_jobs))
        stopped_at = time.time()
        first.close()
        time.sleep(max(0.0, args.down_s - (time.time() - stopped_at)))
        before = sim.stats()
        ended_while_down = sum(
            1 for t in tracked if (before[t]["completed_at"] or 1e18) < time.time()
        )
        second = Daemon(sim, Path(tmp), budget=args.budget, port=port)
        try:
            started = second.started_at
            first_query: float | None = None
            while True:
                if first_query is None:
                    stats = sim.stats()
                    asked = [
                        stats[t]["last_status_query_at"]
                        for t in tracked
                        if (stats[t]["last_status_query_at"] or 0) > started
                    ]
                    if asked:
                        first_query = min(asked)
                if second.unfinished() == 0:
                    break
                if time.time() - started > 120:
                    raise RuntimeError("jobs still unfinished 120 s after the restart")
                time.sleep(0.1)
            ends = [parse_iso(j["ended_at"]) or 0.0 for j in second.jobs()]
            all_ended = max(ends) - started
        finally:
            second.close()
            sim.close()
    return {
        "part": "c",
        "jobs": args.restart_jobs,
        "down_s": args.down_s,
        "ended_while_down": ended_while_down,
        "budget": args.budget or 8.0,
        "start_to_first_query_s": None if first_query is None else round(first_query - started, 2),
        "start_to_all_ended_s": round(all_ended, 2),
    }


def part_d() -> dict[str, Any]:
    path = REPO / "bench" / "shutdown.py"
    if not path.exists():
        return {"part": "d", "skipped": "bench/shutdown.py is not here"}
    spec = importlib.util.spec_from_file_location("bench_shutdown", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"part": "d", "result": module.main([])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices="abcd", required=True)
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 100, 1000],
        help="jobs in flight for parts a and b (default: 10,100,1000)",
    )
    p.add_argument("--duration", default="4-30", help="task durations below 1,000 jobs")
    p.add_argument("--duration-large", default="4-30", help="task durations at 1,000 jobs or more")
    p.add_argument("--budget", type=float, help="KIED_STATUS_QUERIES_PER_S (default: kied's)")
    p.add_argument("--within-s", type=float, default=900.0, help="give up on a run after this")
    p.add_argument("--down-s", type=float, default=30.0, help="part c: how long kied is down")
    p.add_argument("--restart-jobs", type=int, default=50, help="part c: jobs in flight")
    args = p.parse_args(argv)
    if args.part in "ab":
        result = part_ab(args, drop=1.0 if args.part == "a" else 0.0)
    elif args.part == "c":
        result = part_c(args)
    else:
        result = part_d()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
