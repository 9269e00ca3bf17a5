"""Several real `kied serve` processes on one PostgreSQL database behave as one daemon.

Each test gets its own database: on the common server, or, for a test that restarts the
server, on a PostgreSQL cluster of its own (``pg_cluster``). The instances have no public
URL, so KIE (kied's simulator, a real process) never calls back on its own: jobs end by
polling, or by the callbacks the tests send to the instance of their choice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from kied.leadership._postgres import LOCK_KEY
from tests.procs import free_port, kied, mode, read_url, stop, wait_until

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    db_url: str
    sim_url: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def start(self, **env: str) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.procs[url] = kied(
            "serve",
            "--port",
            str(port),
            env={
                "KIED_DATABASE_URL": self.db_url,
                "KIE_BASE_URL": self.sim_url,
                "KIE_API_KEY": "k",
                "KIED_LOG_LEVEL": "INFO",
                **env,
            },
        )
        read_url(self.procs[url])
        return url

    def modes(self) -> dict[str, str | None]:
        return {url: mode(url) for url, proc in self.procs.items() if proc.poll() is None}

    def leader(self) -> str:
        def one() -> str | None:
            active = [url for url, m in self.modes().items() if m == "ACTIVE"]
            return active[0] if len(active) == 1 else None

        return str(wait_until(one, within_s=20))

    def sim_task(self, task_id: str) -> dict:
        r = httpx.get(f"{self.sim_url}/_sim/stats", params={"taskId": task_id}, timeout=5)
        return r.json()["tasks"][task_id]

    def create_sim_task(self, **headers: str) -> str:
        r = httpx.post(
            f"{self.sim_url}/api/v1/jobs/createTask",
            json={"model": "m", "input": {"prompt": "x"}},
            headers={"Authorization": "Bearer k", **headers},
            timeout=5,
        )
        return str(r.json()["data"]["taskId"])

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc, signal.SIGKILL if proc.poll() is None else signal.SIGTERM)


@pytest.fixture
def sim():
    proc = kied("simulate", "--port", "0", "--duration", "2", "--seed", "11")
    try:
        yield read_url(proc, stream="stdout")
    finally:
        stop(proc)


@pytest.fixture
def fleet(pg_url, sim):
    f = Fleet(db_url=pg_url, sim_url=sim)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def own_cluster_fleet(pg_cluster, sim):
    """A fleet on a database of ``pg_cluster``: the test may stop or restart its server."""
    f = Fleet(db_url=pg_cluster.create_database("kied"), sim_url=sim)
    try:
        yield f
    finally:
        f.close()


def submit(url: str, **body) -> dict:
    body.setdefault("model", "m")
    body.setdefault("input", {"prompt": "x"})
    r = httpx.post(f"{url}/v1/jobs", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()


def wait_job(url: str, job_id: str, within_s: float = 60) -> dict:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/v1/jobs/{job_id}", params={"wait": 5}, timeout=15)
        job = r.json()
        if job["terminal"]:
            return job
    raise AssertionError(f"job {job_id} did not end")


def test_exactly_one_instance_is_active(fleet):
    urls = [fleet.start() for _ in range(3)]
    leader = fleet.leader()
    for _ in range(20):
        modes = fleet.modes()
        assert list(modes.values()).count("ACTIVE") == 1, modes
        time.sleep(0.05)
    health = httpx.get(f"{leader}/healthz", timeout=5).json()
    assert health["lock"] == "postgres"
    assert health["leader_for_s"] >= 0
    passive = next(u for u in urls if u != leader)
    assert httpx.get(f"{passive}/healthz", timeout=5).json()["leader_for_s"] is None


def test_a_callback_at_a_passive_instance_stops_the_leaders_poller(fleet):
    urls = [fleet.start() for _ in range(2)]
    leader = fleet.leader()
    passive = next(u for u in urls if u != leader)
    task_id = fleet.create_sim_task(**{"X-Sim-Duration": "600"})
    job = submit(passive, task_id=task_id, family="market", model=None, input=None)
    wait_until(lambda: fleet.sim_task(task_id)["status_queries"] >= 1, within_s=15)

    callback = {
        "code": 200,
        "msg": "Playground task completed successfully.",
        "data": {
            "taskId": task_id,
            "state": "success",
            "resultJson": json.dumps({"resultUrls": ["https://cdn.test/a.png"]}),
        },
    }
    r = httpx.post(f"{passive}/callbacks/kie", json=callback, timeout=5)
    assert r.status_code == 200
    done = wait_job(leader, job["id"], within_s=10)
    assert done["state"] == "succeeded"
    assert done["ended_by"] == "callback"
    queries = fleet.sim_task(task_id)["status_queries"]
    time.sleep(4)  # several poll intervals of the not-called-back schedule
    assert fleet.sim_task(task_id)["status_queries"] == queries


def test_kill_9_of_the_leader_hands_over_and_jobs_keep_their_deadlines(fleet):
    for _ in range(2):
        fleet.start()
    leader = fleet.leader()
    stuck = [submit(leader, timeout_s=8, input={"prompt": "stuck"}) for _ in range(3)]
    jobs = [submit(leader) for _ in range(3)]
    wait_until(
        lambda: all(
            httpx.get(f"{leader}/v1/jobs/{j['id']}", timeout=5).json()["task_id"]
            for j in [*stuck, *jobs]
        )
    )
    # A deadline counts from the job's createTask: as it stands once the task is created.
    stuck = [httpx.get(f"{leader}/v1/jobs/{j['id']}", timeout=5).json() for j in stuck]
    killed_at = time.monotonic()
    fleet.procs[leader].kill()
    fleet.procs[leader].wait()
    new_leader = fleet.leader()
    takeover_s = time.monotonic() - killed_at
    assert new_leader != leader
    assert takeover_s < 5
    for job in jobs:
        assert wait_job(new_leader, job["id"])["state"] == "succeeded"
    for job in stuck:
        done = wait_job(new_leader, job["id"])
        assert done["deadline_at"] == job["deadline_at"]
        assert done["state"] in ("timed_out", "succeeded")


def test_sigterm_of_the_leader_hands_over_without_a_gap(fleet):
    for _ in range(2):
        fleet.start()
    leader = fleet.leader()
    proc = fleet.procs[leader]
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    new_leader = fleet.leader()
    handover_s = time.monotonic() - started
    assert new_leader != leader
    assert handover_s < 3
    assert proc.wait(timeout=15) == 0


def test_a_terminated_lock_connection_makes_the_leader_step_down(fleet, pg_server):
    for _ in range(2):
        fleet.start()
    leader = fleet.leader()
    with pg_server.connect() as conn:
        conn.autocommit = True
        killed = conn.execute(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
            " WHERE a.application_name = 'kied-leader' AND a.datname = %s"
            " AND l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s",
            (fleet.db_url.rsplit("/", 1)[1], LOCK_KEY >> 32, LOCK_KEY & 0xFFFF_FFFF),
        ).fetchall()
    assert killed == [(True,)]
    # one leader emerges (the old one, back in line, or the standby), never two
    for _ in range(40):
        assert list(fleet.modes().values()).count("ACTIVE") <= 1
        time.sleep(0.05)
    fleet.leader()
    log_ok = fleet.procs[leader].poll() is None
    assert log_ok  # stepping down is not dying


def test_postgresql_restarted_under_load_loses_no_job(pg_cluster, own_cluster_fleet):
    fleet = own_cluster_fleet
    for _ in range(2):
        fleet.start()
    leader = fleet.leader()
    accepted = [submit(leader) for _ in range(10)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        restarted = pool.submit(pg_cluster.restart)
        # Keep the fleet busy while the server goes away and comes back: submissions may
        # be refused while it is down, but every one that was accepted must end.
        while not restarted.done():
            for url in list(fleet.procs):
                try:
                    r = httpx.post(
                        f"{url}/v1/jobs", json={"model": "m", "input": {"p": 1}}, timeout=5
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 201:
                    accepted.append(r.json())
                r = httpx.post(
                    f"{url}/callbacks/kie",
                    json={"code": 200, "data": {"taskId": "unknown"}},
                    timeout=5,
                )
                assert r.status_code == 200  # even while nothing can be stored
            time.sleep(0.05)
        restarted.result()
    leader = fleet.leader()
    for job in accepted:
        done = wait_job(leader, job["id"], within_s=90)
        assert done["state"] == "succeeded", done
    assert list(fleet.modes().values()).count("ACTIVE") == 1
