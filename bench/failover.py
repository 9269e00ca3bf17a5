"""Failover and cross-instance wake-up of a kied fleet on one PostgreSQL database.

    python bench/failover.py [--runs 10] [--wakeups 200]

Measures, with real `kied serve` processes and a real `kied simulate`:

- kill -9 of the leader → another instance reporting ACTIVE on /healthz (median of runs);
- SIGTERM of the leader → another instance reporting ACTIVE (median of runs);
- a callback sent to a PASSIVE instance → the leader's poller for that job stopped
  (read from the leader's DEBUG log line, millisecond stamps), p50/p99.

Needs PostgreSQL at the libpq PG* address (default 127.0.0.1:5432, user postgres); it
creates and drops its own database.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.procs import free_port, kied, mode, read_url, stop  # noqa: E402

DB = "kied_bench_failover"


def admin() -> psycopg.Connection:
    host = os.environ.get("PGHOST", "127.0.0.1")
    user = os.environ.get("PGUSER", "postgres")
    return psycopg.connect(f"host={host} user={user} dbname=postgres", autocommit=True)


class Instance:
    def __init__(self, db_url: str, sim_url: str, *, debug: bool = False) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            "KIED_DATABASE_URL": db_url,
            "KIE_BASE_URL": sim_url,
            "KIE_API_KEY": "k",
            "KIED_LOG_LEVEL": "DEBUG" if debug else "INFO",
        }
        self.proc = kied("serve", "--port", str(port), env=env)
        read_url(self.proc)
        self.stopped: dict[str, float] = {}
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        pattern = re.compile(r"^(\S+ \S+) \S+ kied\.pollers: \[GEN\] poller for job (\w+) stopped")
        for line in self.proc.stderr:
            m = pattern.search(line)
            if m:
                stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                self.stopped[m.group(2)] = stamp


def wait_leader(instances: list[Instance], within_s: float = 30) -> tuple[Instance, float]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for inst in instances:
            if inst.proc.poll() is None and mode(inst.url) == "ACTIVE":
                return inst, time.monotonic()
        time.sleep(0.002)
    raise RuntimeError("no leader")


def takeover(db_url: str, sim_url: str, sig: int, runs: int) -> list[float]:
    times = []
    pair = [Instance(db_url, sim_url), Instance(db_url, sim_url)]
    for _ in range(runs):
        leader, _ = wait_leader(pair)
        standby = next(i for i in pair if i is not leader)
        while mode(standby.url) != "PASSIVE":
            time.sleep(0.01)
        t0 = time.monotonic()
        leader.proc.send_signal(sig)
        new, t1 = wait_leader([standby])
        times.append(t1 - t0)
        stop(leader.proc, signal.SIGKILL)
        pair = [new, Instance(db_url, sim_url)]
    for inst in pair:
        stop(inst.proc)
    return times


def wakeups(db_url: str, sim_url: str, n: int) -> list[float]:
    leader_candidate = Instance(db_url, sim_url, debug=True)
    wait_leader([leader_candidate])
    passive = Instance(db_url, sim_url)
    http = httpx.Client(timeout=10)
    jobs = []
    for _ in range(n):
        r = http.post(
            f"{sim_url}/api/v1/jobs/createTask",
            json={"model": "m", "input": {"prompt": "x"}},
            headers={"Authorization": "Bearer k", "X-Sim-Duration": "3600"},
        )
        task_id = r.json()["data"]["taskId"]
        job = http.post(
            f"{passive.url}/v1/jobs", json={"task_id": task_id, "family": "market"}
        ).json()
        jobs.append((job["id"], task_id))
    time.sleep(3)  # the leader has a poller for every job
    latencies = []
    for job_id, task_id in jobs:
        body = {
            "code": 200,
            "msg": "ok",
            "data": {
                "taskId": task_id,
                "state": "success",
                "resultJson": '{"resultUrls":["https://x.test/a.png"]}',
            },
        }
        sent = time.time()
        http.post(f"{passive.url}/callbacks/kie", json=body)
        deadline = time.monotonic() + 10
        while job_id not in leader_candidate.stopped and time.monotonic() < deadline:
            time.sleep(0.001)
        if job_id in leader_candidate.stopped:
            latencies.append(leader_candidate.stopped[job_id] - sent)
    http.close()
    stop(passive.proc)
    stop(leader_candidate.proc)
    return latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--wakeups", type=int, default=200)
    args = parser.parse_args()
    with admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    db_url = f"postgresql://{os.environ.get('PGUSER', 'postgres')}@{os.environ.get('PGHOST', '127.0.0.1')}/{DB}"
    sim = kied("simulate", "--port", "0", "--duration", "3600")
    try:
        sim_url = read_url(sim, stream="stdout")
        kill = takeover(db_url, sim_url, signal.SIGKILL, args.runs)
        term = takeover(db_url, sim_url, signal.SIGTERM, args.runs)
        wake = wakeups(db_url, sim_url, args.wakeups)
    finally:
        stop(sim)
        with admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    report = {
        "kill9_to_active_ms": {
            "median": round(statistics.median(kill) * 1000, 1),
            "max": round(max(kill) * 1000, 1),
            "runs": len(kill),
        },
        "sigterm_to_active_ms": {
            "median": round(statistics.median(term) * 1000, 1),
            "max": round(max(term) * 1000, 1),
            "runs": len(term),
        },
        "passive_callback_to_poller_exit_ms": {
            "p50": round(pct(wake, 0.5) * 1000, 1),
            "p99": round(pct(wake, 0.99) * 1000, 1),
            "n": len(wake),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
