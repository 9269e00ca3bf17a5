"""Archiving result files: callback → files kept, throughput, CPU, and what downloads cost the
callbacks that arrive meanwhile.

Starts ``kied simulate`` (files of ``--size``) and ``kied serve`` (SQLite, ``KIED_ARCHIVE=dir:``)
as processes. Phase A sends ``--probe-rate`` authenticated callbacks a second (tracked jobs that
fail: nothing to archive) for ``--probe-s`` seconds with nothing downloading: the callback
answer's latency. Phase B creates ``--jobs`` tasks at the simulator, tracked by kied; the simulator calls
back after ``--duration`` and kied downloads each result file from it, while the same probe callbacks run.
Prints JSON: callback → archived p50/p99 (kied's own ``ended_at`` and ``archived_at``), MB/s,
kied's CPU share (of one core) during phase B, and the probe's p50/p99 in both phases.

    .venv/bin/python bench/archive.py --jobs 200 --size 1M-20M
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import trio
from _common import PYTHON, base_env, free_port, start_and_wait, stop

TOKEN = "cb-bench"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _quantiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {"n": 0}
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(values[-1] * 1000, 1),
        "n": len(values),
    }


async def _probe(
    kied: httpx.AsyncClient, prefix: str, rate: float, stop_at: float, latencies: list[float]
) -> None:
    """Fail callbacks for tracked jobs, ``rate`` a second until ``stop_at`` (or cancelled):
    their answers' latency, appended to ``latencies``."""
    n = 0
    while time.monotonic() < stop_at:
        task_id = f"{prefix}-{n}"
        n += 1
        r = await kied.post("/v1/jobs", json={"task_id": task_id, "family": "market"})
        assert r.status_code == 201, r.text
        data = {"taskId": task_id, "state": "fail", "failCode": "500", "failMsg": "probe"}
        body = {"code": 501, "msg": "failed", "data": data}
        t0 = time.perf_counter()
        r = await kied.post(f"/callbacks/kie?token={TOKEN}", json=body)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200
        await trio.sleep(1 / rate)


async def _run(args: argparse.Namespace, url: str, sim_url: str, pid: int) -> dict[str, object]:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, trust_env=False) as kied:
        quiet: list[float] = []
        await _probe(kied, "quiet", args.probe_rate, time.monotonic() + args.probe_s, quiet)

        # Tasks are created at the simulator directly (kied's own createTask calls are held
        # to KIE's rate limit, 20 per 10 s), and kied tracks them: their callbacks come to
        # kied within --duration of their creation.
        job_ids = []
        async with httpx.AsyncClient(base_url=sim_url, timeout=60, trust_env=False) as sim:
            for i in range(args.jobs):
                r = await sim.post(
                    "/api/v1/jobs/createTask",
                    json={
                        "model": "bench/model",
                        "callBackUrl": f"{url}/callbacks/kie?token={TOKEN}",
                        "input": {"prompt": str(i)},
                    },
                    headers={"Authorization": "Bearer bench"},
                )
                task_id = r.json()["data"]["taskId"]
                r = await kied.post("/v1/jobs", json={"task_id": task_id, "family": "market"})
                assert r.status_code == 201, r.text
                job_ids.append(r.json()["id"])
        cpu0, t0 = _cpu_s(pid), time.monotonic()
        busy: list[float] = []
        done: dict[str, dict] = {}

        async def collect() -> None:
            while len(done) < len(job_ids):
                await trio.sleep(0.5)
                r = await kied.get("/v1/jobs", params={"state": "succeeded", "limit": 1000})
                for job in r.json()["jobs"]:
                    state = (job.get("archive") or {}).get("state")
                    if job["id"] in job_ids and state in ("archived", "failed"):
                        done[job["id"]] = job

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_probe, kied, "busy", args.probe_rate, time.monotonic() + 1e6, busy)
            with trio.fail_after(args.timeout_s):
                await collect()
            nursery.cancel_scope.cancel()
        seconds = time.monotonic() - t0
        cpu = _cpu_s(pid) - cpu0
    archived = [j for j in done.values() if j["archive"]["state"] == "archived"]
    waits = [max(_ts(f["archived_at"]) for f in j["files"]) - _ts(j["ended_at"]) for j in archived]
    total = sum(f["size"] for j in archived for f in j["files"])
    first_end = min(_ts(j["ended_at"]) for j in archived)
    last_kept = max(_ts(f["archived_at"]) for j in archived for f in j["files"])
    return {
        "jobs": args.jobs,
        "size": args.size,
        "archived": len(archived),
        "failed": len(done) - len(archived),
        "bytes": total,
        "callback_to_archived": _quantiles(waits),
        "mb_per_s": round(total / (last_kept - first_end) / 1e6, 1),
        "kied_cpu_share": round(cpu / seconds, 3),
        "phase_b_s": round(seconds, 1),
        "callback_latency_quiet": _quantiles(quiet),
        "callback_latency_while_archiving": _quantiles(busy),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--size", default="1M-20M", help="kied simulate --file-size")
    p.add_argument("--duration", default="1-10", help="kied simulate --duration")
    p.add_argument("--concurrency", default="4", help="KIED_ARCHIVE_CONCURRENCY")
    p.add_argument("--probe-rate", type=float, default=20.0)
    p.add_argument("--probe-s", type=float, default=10.0)
    p.add_argument("--timeout-s", type=float, default=600.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kied-bench-archive-") as tmp:
        sim_port, port = free_port(), free_port()
        sim_cmd = [PYTHON, "-m", "kied", "simulate", "--port", str(sim_port)]
        sim_cmd += ["--duration", args.duration, "--file-size", args.size, "--log-level", "warning"]
        sim, _ = start_and_wait(sim_cmd, sim_port, base_env())
        env = base_env() | {
            "KIED_DATABASE_URL": str(Path(tmp) / "kied.db"),
            "KIED_ARCHIVE": f"dir:{Path(tmp) / 'archive'}",
            "KIED_ARCHIVE_ALLOW_HOSTS": f"127.0.0.1:{sim_port}",
            "KIED_ARCHIVE_CONCURRENCY": args.concurrency,
            "KIE_BASE_URL": f"http://127.0.0.1:{sim_port}",
            "KIE_API_KEY": "bench",
            "KIED_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "KIED_CALLBACK_TOKEN": TOKEN,
            "KIED_LOG_LEVEL": "WARNING",
        }
        cmd = [PYTHON, "-m", "kied", "serve", "--port", str(port)]
        kied, _ = start_and_wait(cmd, port, env, log=Path(tmp) / "kied.log")
        try:
            result = trio.run(
                _run, args, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sim_port}", kied.pid
            )
        finally:
            stop(kied)
            stop(sim)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
