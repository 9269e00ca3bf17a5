"""Tasks per job when the leader stops, dies or loses PostgreSQL while createTask is in flight.

    python bench/submissions.py [--jobs 20] [--runs 3] [--create-delay 3]
                                [--scenarios sqlite-sigterm,sqlite-kill9,pg-sigterm,pg-kill9,pg-restart]
                                [--daemon-src DIR]

Real `kied serve` processes and a real `kied simulate --create-delay S` (KIE creates each
task at once and answers createTask S seconds later). In each run the leader gets JOBS
jobs, every createTask is sent, and while none is answered the leader is stopped
(SIGTERM), killed (kill -9) or its PostgreSQL server restarted (a throwaway cluster). The
next leader (the same daemon restarted on SQLite, a standby on PostgreSQL) finishes them.

Reported per scenario, from the simulator's own record of the tasks it created:
tasks per job (mean, max), jobs that ended with another task's outcome, the stop's
duration (SIGTERM), and the time from the next leader's start (or take-over) to each job
ending, p50 / max. ``--daemon-src DIR`` runs the daemons from another checkout (e.g. an
older commit, from `git worktree add`), against this checkout's simulator.

Needs PostgreSQL at the libpq PG* address for the pg-* scenarios (pg-restart runs its own
cluster).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.test_one_task_per_job import Rig  # noqa: E402
from tests.pg import PgCluster, PgClusterTemplate, PgDatabases, PgServer  # noqa: E402
from tests.procs import free_port, kied, read_url, stop  # noqa: E402

SCENARIOS = ("sqlite-sigterm", "sqlite-kill9", "pg-sigterm", "pg-kill9", "pg-restart")


def one_run(scenario: str, rig: Rig, jobs: int, cluster: PgCluster | None) -> dict[str, float]:
    port = free_port()
    standby_port = free_port()
    sqlite = scenario.startswith("sqlite")
    first = rig.start(port, public_port=None if sqlite else standby_port)
    rig.leader()
    standby = None if sqlite else rig.start(standby_port)
    ids = rig.submit_many(first, jobs)
    result: dict[str, float] = {}
    t0 = time.monotonic()
    if scenario.endswith("sigterm"):
        stop(rig.procs.pop(first), signal.SIGTERM)
        result["stop_s"] = time.monotonic() - t0
    elif scenario.endswith("kill9"):
        stop(rig.procs.pop(first), signal.SIGKILL)
    else:
        assert cluster is not None
        cluster.restart()
    if sqlite:
        t0 = time.monotonic()
        leader = rig.start(port)
    else:
        leader = rig.leader() if scenario == "pg-restart" else standby
        assert leader is not None
    ended = rig.wait_jobs(leader, ids, within_s=120)
    took_s = time.monotonic() - t0
    created = rig.tasks_by_job()
    tasks = rig.sim_stats()["tasks"]
    # from the job's own task ending at KIE to the job ending in kied
    lags = [
        datetime.fromisoformat(job["ended_at"].replace("Z", "+00:00")).timestamp()
        - tasks[job["task_id"]]["completed_at"]
        for job in ended
        if job["task_id"] in tasks and tasks[job["task_id"]]["completed_at"] is not None
    ]
    if lags:
        result["lag_p50_s"] = statistics.median(lags)
        result["lag_max_s"] = max(lags)
    per_job = [len(created.get(j, [])) for j in ids]
    wrong = 0
    for job in ended:
        urls = job["result_urls"]
        if job["state"] == "succeeded" and not all(f"/{job['task_id']}/" in u for u in urls):
            wrong += 1
    result.update(
        tasks_per_job=statistics.fmean(per_job),
        max_tasks_per_job=max(per_job),
        twice=sum(1 for n in per_job if n > 1),
        wrong_outcome=wrong,
        succeeded=sum(1 for j in ended if j["state"] == "succeeded"),
        all_ended_s=took_s,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--create-delay", type=float, default=3.0)
    parser.add_argument("--duration", default="5")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--daemon-src", type=Path, default=None)
    args = parser.parse_args()
    daemon_src = None if args.daemon_src is None else args.daemon_src.resolve()
    env = {} if daemon_src is None else {"PYTHONPATH": str(daemon_src)}
    server = PgServer()
    template: PgClusterTemplate | None = None
    print(
        f"jobs {args.jobs}, createTask answered after {args.create_delay:g} s, tasks take "
        f"{args.duration} s; daemon from {args.daemon_src or REPO}"
    )
    for scenario in args.scenarios.split(","):
        rows = []
        for _ in range(args.runs):
            sim = kied(
                "simulate",
                "--port",
                "0",
                "--duration",
                args.duration,
                "--create-delay",
                str(args.create_delay),
                "--seed",
                "3",
            )
            databases = PgDatabases(server)
            cluster = None
            try:
                sim_url = read_url(sim, stream="stdout")
                with tempfile.TemporaryDirectory() as tmp:
                    if scenario.startswith("sqlite"):
                        database = str(Path(tmp) / "kied.db")
                    elif scenario == "pg-restart":
                        template = template or PgClusterTemplate()
                        cluster = PgCluster(template)
                        cluster.start()
                        database = cluster.create_database("kied", empty=True)
                    else:
                        database = databases.new(empty=True)
                    rig = Rig(sim_url=sim_url, database=database, env=dict(env), cwd=daemon_src)
                    try:
                        rows.append(one_run(scenario, rig, args.jobs, cluster))
                    finally:
                        for proc in rig.procs.values():
                            stop(proc, signal.SIGKILL)
            finally:
                stop(sim)
                databases.drop_all()
                if cluster is not None:
                    cluster.close()

        def mean(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.fmean(r[key] for r in rows if key in r)

        line = (
            f"{scenario:15} tasks/job {mean('tasks_per_job'):.2f} (max"
            f" {max(r['max_tasks_per_job'] for r in rows):.0f}), created twice"
            f" {sum(r['twice'] for r in rows):.0f}/{args.jobs * len(rows)},"
            f" another task's outcome {sum(r['wrong_outcome'] for r in rows):.0f},"
            f" succeeded {sum(r['succeeded'] for r in rows):.0f},"
            f" all ended after {mean('all_ended_s'):.1f} s"
        )
        if any("lag_p50_s" in r for r in rows):
            line += (
                f", task end→job end p50 {mean('lag_p50_s') * 1000:.0f} ms"
                f" (max {max(r.get('lag_max_s', 0) for r in rows) * 1000:.0f} ms)"
            )
        if any("stop_s" in r for r in rows):
            line += (
                f", SIGTERM→exit {mean('stop_s'):.2f} s (max {max(r['stop_s'] for r in rows):.2f})"
            )
        print(line, flush=True)
    if template is not None:
        template.remove()


if __name__ == "__main__":
    main()
