"""One paid generation per job, with real `kied serve` processes and a real simulator.

KIE (``kied simulate --create-delay 3``) creates each task at once and answers createTask
three seconds later: the window in which a leader that stops, dies or loses its database
used to leave jobs without their task id, so that the next leader created them again.
Every daemon has a public URL (its own), so the simulator calls back with the job's id.
What is counted is the simulator's own record: the tasks it created, per job.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.procs import free_port, kied, mode, read_url, stop, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

JOBS = 10


@dataclass
class Rig:
    sim_url: str
    database: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    #: where the daemons run from (another checkout's kied, for comparisons)
    cwd: Path | None = None

    def start(self, port: int | None = None, *, public_port: int | None = None) -> str:
        """Start `kied serve`; its callbacks go to ``public_port`` (its own by default)."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        public = f"http://127.0.0.1:{public_port or port}"
        self.procs[url] = kied(
            "serve",
            "--port",
            str(port),
            "--database",
            self.database,
            env={
                "KIE_BASE_URL": self.sim_url,
                "KIE_API_KEY": "k",
                "KIED_PUBLIC_URL": public,
                "KIED_LOG_LEVEL": "INFO",
                **self.env,
            },
            cwd=self.cwd,
        )
        read_url(self.procs[url])
        return url

    def leader(self) -> str:
        def one() -> str | None:
            live = [u for u, p in self.procs.items() if p.poll() is None]
            active = [u for u in live if mode(u) == "ACTIVE"]
            return active[0] if len(active) == 1 else None

        return str(wait_until(one, within_s=20))

    def sim_stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.sim_url}/_sim/stats", timeout=5).json())

    def tasks_by_job(self) -> dict[str, list[str]]:
        """The tasks the simulator created for each job (the callback URL names the job)."""
        jobs: dict[str, list[str]] = {}
        for task_id, task in self.sim_stats()["tasks"].items():
            job_id = httpx.URL(task["callback_url"]).params["job"]
            jobs.setdefault(job_id, []).append(task_id)
        return jobs

    def submit_many(self, url: str, n: int = JOBS) -> list[str]:
        ids = []
        for i in range(n):
            r = httpx.post(
                f"{url}/v1/jobs", json={"model": "m", "input": {"prompt": f"p{i}"}}, timeout=10
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        # every createTask sent (the simulator has the task), none answered yet
        wait_until(lambda: self.sim_stats()["totals"]["tasks"] == n, within_s=10, interval=0.02)
        assert self.sim_stats()["totals"]["creates_answered"] == 0
        return ids

    def wait_jobs(self, url: str, ids: list[str], within_s: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(ids):
            assert time.monotonic() < deadline, f"jobs not ended: {set(ids) - set(done)}"
            for job_id in ids:
                if job_id in done:
                    continue
                try:
                    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()
                except httpx.HTTPError:
                    continue
                if job["terminal"]:
                    done[job_id] = job
            time.sleep(0.1)
        return [done[i] for i in ids]

    def check_one_task_each(self, jobs: list[dict[str, Any]]) -> None:
        """Each job ended from the one task KIE created for it, with that task's outcome."""
        created = self.tasks_by_job()
        stats = self.sim_stats()["tasks"]
        for job in jobs:
            assert created[job["id"]] == [job["task_id"]], (job, created[job["id"]])
            assert job["state"] == "succeeded"
            assert stats[job["task_id"]]["state"] == "success"
            assert job["result_urls"]
            assert all(f"/{job['task_id']}/" in u for u in job["result_urls"])
            assert job["other_task_ids"] == []
        assert Counter(len(t) for t in created.values()) == {1: len(jobs)}


@pytest.fixture
def sim() -> Iterator[str]:
    proc = kied("simulate", "--port", "0", "--duration", "5", "--create-delay", "3", "--seed", "5")
    try:
        yield read_url(proc, stream="stdout")
    finally:
        stop(proc)


@pytest.fixture
def sqlite_rig(sim: str, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(sim_url=sim, database=str(tmp_path / "kied.db"))
    yield rig
    for proc in rig.procs.values():
        stop(proc, signal.SIGKILL)


@pytest.fixture
def pg_rig(sim: str, pg_url: str) -> Iterator[Rig]:
    rig = Rig(sim_url=sim, database=pg_url)
    yield rig
    for proc in rig.procs.values():
        stop(proc, signal.SIGKILL)


@pytest.fixture
def own_cluster_rig(sim: str, pg_cluster) -> Iterator[Rig]:
    rig = Rig(sim_url=sim, database=pg_cluster.create_database("kied"))
    yield rig
    for proc in rig.procs.values():
        stop(proc, signal.SIGKILL)


def test_sigterm_with_creates_in_flight_pays_once_sqlite(sqlite_rig: Rig) -> None:
    port = free_port()
    url = sqlite_rig.start(port)
    sqlite_rig.leader()
    ids = sqlite_rig.submit_many(url)
    signalled = time.monotonic()
    assert stop(sqlite_rig.procs.pop(url)) == 0
    stopped_s = time.monotonic() - signalled
    # it waited for KIE's answers (3 s after sending), not for the 10-s budget
    assert stopped_s < 6, stopped_s
    assert sqlite_rig.sim_stats()["totals"]["creates_answered"] == JOBS
    url = sqlite_rig.start(port)
    sqlite_rig.check_one_task_each(sqlite_rig.wait_jobs(url, ids))


def test_kill_9_with_creates_in_flight_adopts_the_orphans_sqlite(sqlite_rig: Rig) -> None:
    port = free_port()
    url = sqlite_rig.start(port)
    sqlite_rig.leader()
    ids = sqlite_rig.submit_many(url)
    stop(sqlite_rig.procs.pop(url), signal.SIGKILL)
    restarted = time.monotonic()
    url = sqlite_rig.start(port)
    jobs = sqlite_rig.wait_jobs(url, ids)
    adopted_s = time.monotonic() - restarted
    sqlite_rig.check_one_task_each(jobs)
    assert {j["ended_by"] for j in jobs} == {"callback"}
    assert {j["submission"]["count"] for j in jobs} == {1}
    assert adopted_s < 15  # the tasks took 5 s; their callbacks named the jobs
    assert sqlite_rig.sim_stats()["totals"]["creates_answered"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_leader_change_with_creates_in_flight_pays_once_postgres(pg_rig: Rig, sig) -> None:
    standby_port = free_port()
    leader = pg_rig.start(public_port=standby_port)
    pg_rig.leader()
    standby = pg_rig.start(standby_port)
    ids = pg_rig.submit_many(leader)
    stop(pg_rig.procs.pop(leader), sig)
    assert pg_rig.leader() == standby
    jobs = pg_rig.wait_jobs(standby, ids)
    pg_rig.check_one_task_each(jobs)
    answered = pg_rig.sim_stats()["totals"]["creates_answered"]
    assert answered == (JOBS if sig == signal.SIGTERM else 0)


def test_postgresql_restart_with_creates_in_flight_pays_once(own_cluster_rig: Rig, pg_cluster):
    rig = own_cluster_rig
    standby_port = free_port()
    first = rig.start(public_port=standby_port)
    rig.leader()
    rig.start(standby_port)
    ids = rig.submit_many(first)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(pg_cluster.restart).result(timeout=60)
    leader = rig.leader()
    jobs = rig.wait_jobs(leader, ids)
    rig.check_one_task_each(jobs)
