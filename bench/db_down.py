"""Authenticated callbacks while PostgreSQL is down: every one answered 200, stored once.

    python bench/db_down.py [--jobs 400] [--rate 10] [--down 30]

Makes a throwaway PostgreSQL cluster (tests/pg.py PgCluster: initdb in a temporary
directory, a port of its own; the system server is never touched), starts ``kied serve``
on it with a callback token, and tracks ``--jobs`` tasks through the API. A steady stream
of ``--rate`` success callbacks a second, one per job, runs while the cluster is stopped
for ``--down`` seconds and started again. Reports every answer, the slowest answers, and
once the journal has been written to the database: inbox rows, distinct journal ids,
jobs succeeded and ``job.succeeded`` events per job.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from _common import PYTHON, REPO, base_env, compile_project, free_port, start_and_wait, stop

sys.path.insert(0, str(REPO))

from tests.pg import PgCluster

TOKEN = "bench-token"


def callback(task_id: str) -> bytes:
    data = {
        "taskId": task_id,
        "state": "success",
        "resultJson": json.dumps({"resultUrls": [f"https://cdn.example.test/{task_id}.png"]}),
    }
    return json.dumps({"code": 200, "msg": "ok", "data": data}).encode()


async def stream(
    port: int, cluster: PgCluster, jobs: int, rate: float, down_at: float, down_s: float
) -> tuple[dict[str, int], list[float], dict[str, float]]:
    answers: dict[str, int] = {}
    latencies: list[float] = []
    phases: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:

        async def send(i: int) -> None:
            t0 = trio.current_time()
            try:
                r = await http.post(
                    "/callbacks/kie",
                    content=callback(f"task-{i}"),
                    headers={"X-KIE-Callback-Token": TOKEN, "Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            else:
                body = r.json()
                key = f"{r.status_code} " + ("journal" if body.get("journal") else "stored")
                if not body.get("stored"):
                    key = f"{r.status_code} NOT STORED"
            latencies.append(trio.current_time() - t0)
            answers[key] = answers.get(key, 0) + 1

        async def outage() -> None:
            await trio.sleep(down_at)
            phases["stop_at"] = trio.current_time() - start
            await trio.to_thread.run_sync(lambda: cluster.stop("fast"))
            await trio.sleep(down_s)
            await trio.to_thread.run_sync(cluster.start)
            phases["started_at"] = trio.current_time() - start

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
            for i in range(jobs):
                await trio.sleep_until(start + i / rate)
                nursery.start_soon(send, i)
        phases["stream_s"] = trio.current_time() - start
    return answers, latencies, phases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--down", type=float, default=30.0)
    args = parser.parse_args()
    compile_project()
    cluster = PgCluster()
    try:
        cluster.start()
        url = cluster.create_database("kied")
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            env = {
                **base_env(),
                "KIED_DATABASE_URL": url,
                "KIED_CALLBACK_TOKEN": TOKEN,
                "KIED_JOURNAL_DIR": str(Path(tmp) / "journal"),
                "KIE_BASE_URL": "http://127.0.0.1:9",  # KIE is never reached
                "KIE_API_KEY": "bench",
            }
            cmd = [PYTHON, "-m", "kied", "serve", "--port", str(port)]
            log = Path(tmp) / "kied.log"
            proc, _ = start_and_wait(cmd, port, env, log=log)
            try:
                base = f"http://127.0.0.1:{port}"
                while httpx.get(base + "/readyz").status_code != 200:
                    time.sleep(0.1)
                for i in range(args.jobs):
                    r = httpx.post(
                        base + "/v1/jobs", json={"family": "market", "task_id": f"task-{i}"}
                    )
                    assert r.status_code == 201, r.text
                down_at = min(5.0, args.jobs / args.rate / 4)
                answers, latencies, phases = trio.run(
                    stream, port, cluster, args.jobs, args.rate, down_at, args.down
                )
                started = time.perf_counter()
                with cluster.connect("kied") as conn:
                    while True:
                        (ended,) = conn.execute(
                            "SELECT count(*) FROM jobs WHERE state = 'succeeded'"
                        ).fetchone()
                        if ended == args.jobs or time.perf_counter() - started > 60:
                            break
                        time.sleep(0.1)
                    caught_up = time.perf_counter() - started
                    (rows, distinct) = conn.execute(
                        "SELECT count(*), count(DISTINCT journal_id) FROM callback_inbox"
                    ).fetchone()
                    per_job = conn.execute(
                        "SELECT n, count(*) FROM (SELECT job_id, count(*) AS n FROM events"
                        " WHERE type = 'job.succeeded' GROUP BY job_id) c GROUP BY n"
                    ).fetchall()
                scrape = httpx.get(base + "/metrics").text
            finally:
                stop(proc)
            journaled = [
                line for line in scrape.splitlines() if line.startswith("kied_callbacks_journaled")
            ]
            latencies.sort()
            print(
                json.dumps(
                    {
                        "jobs": args.jobs,
                        "rate_per_s": args.rate,
                        "down_s": args.down,
                        "phases_s": {k: round(v, 2) for k, v in phases.items()},
                        "answers": answers,
                        "answer_s": {
                            "p50": round(latencies[len(latencies) // 2], 3),
                            "p99": round(latencies[int(len(latencies) * 0.99)], 3),
                            "max": round(latencies[-1], 3),
                        },
                        "journaled": journaled,
                        "after_restart_s": round(caught_up, 2),
                        "jobs_succeeded": ended,
                        "inbox_rows": rows,
                        "distinct_journal_ids": distinct,
                        "succeeded_events_per_job": {str(n): c for n, c in per_job},
                    },
                    indent=2,
                )
            )
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
