"""The jobs API over HTTP: the real daemon on 127.0.0.1 and kied's simulator on a real socket.

These run on the wall clock with short simulated durations; the schedule, deadlines and
fault mixes are covered exactly, in virtual time, in test_pollers.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from kied.kie.simulator import SimulatorConfig, serve_simulator
from tests.conftest import wait_for
from tests.procs import free_port, kied, mode, read_url, stop, wait_until

if TYPE_CHECKING:
    from pathlib import Path

TOKEN = "api-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def simulator(nursery):
    async def start(**changes) -> str:
        config = replace(SimulatorConfig(port=0, duration_s=(0.3, 0.3), seed=3), **changes)
        url: str = await nursery.start(serve_simulator, config)
        return url

    return start


@pytest.fixture
async def kied_api(settings, start_daemon, simulator):
    async def start(**sim_changes):
        sim_url = await simulator(**sim_changes)
        port = free_port()
        daemon = await start_daemon(
            settings,
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            kie_base_url=sim_url,
            callback_token="cb-secret",
            api_token=TOKEN,
        )
        return daemon, sim_url

    return start


async def sim_stats(sim_url: str, task_id: str) -> dict:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{sim_url}/_sim/stats", params={"taskId": task_id})
        return r.json()["tasks"][task_id]


async def test_a_job_submitted_over_http_is_finished_by_its_callback(kied_api):
    daemon, sim_url = await kied_api()
    async with daemon.client() as http:
        r = await http.post(
            "/v1/jobs", json={"model": "google/nano-banana", "input": {"prompt": "x"}}, headers=AUTH
        )
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["state"] == "submitting"
        r = await http.get(f"/v1/jobs/{job['id']}", params={"wait": 10}, headers=AUTH)
        done = r.json()
        assert done["state"] == "succeeded", done
        assert done["ended_by"] == "callback"
        assert done["result_urls"]
        assert done["task_id"]
        queries = (await sim_stats(sim_url, done["task_id"]))["status_queries"]
        assert queries <= 1
        await trio.sleep(1.0)
        assert (await sim_stats(sim_url, done["task_id"]))["status_queries"] == queries
        # the callback URL kied gave KIE carried the job id and the callback token
        stats = await sim_stats(sim_url, done["task_id"])
        assert f"job={job['id']}" in stats["callback_url"]
        assert "token=cb-secret" in stats["callback_url"]
    await daemon.shutdown()


async def test_the_api_needs_its_token(kied_api):
    daemon, _ = await kied_api()
    async with daemon.client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = await http.get("/v1/jobs", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"] == "unauthorized"
        assert (await http.get("/v1/jobs", headers=AUTH)).status_code == 200
        assert (await http.get("/healthz")).status_code == 200  # health needs no token
    await daemon.shutdown()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("not json", "body"),
        ([1, 2], "body"),
        ({}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": "prompt"}, "input"),
        ({"family": "dalle", "input": {}}, "family"),
        ({"family": "market", "input": {}}, "model"),
        ({"model": "m", "input": {}, "timeout_s": -1}, "timeout_s"),
        ({"model": "m", "input": {}, "timeout_s": "soon"}, "timeout_s"),
        ({"model": "m", "input": {}, "idempotency_key": 5}, "idempotency_key"),
        ({"model": "m", "input": {}, "metadata": [1]}, "metadata"),
        ({"model": "m", "input": {}, "colour": "red"}, "colour"),
        ({"task_id": "", "family": "veo"}, "task_id"),
        ({"task_id": "t", "family": "veo", "input": {}}, "input"),
    ],
)
async def test_bad_requests_name_the_field(kied_api, body, field):
    daemon, _ = await kied_api()
    async with daemon.client() as http:
        content = body if isinstance(body, str) else json.dumps(body)
        r = await http.post(
            "/v1/jobs", content=content, headers={**AUTH, "content-type": "application/json"}
        )
        assert r.status_code == 400
        assert r.json()["field"] == field
        assert r.json()["error"] == "invalid request"
    await daemon.shutdown()


async def test_get_list_cancel_and_unknown_jobs(kied_api):
    daemon, _ = await kied_api(stuck=1.0)
    async with daemon.client() as http:
        body = {
            "family": "veo",
            "input": {"prompt": "a fox"},
            "metadata": {"chat": 42},
            "idempotency_key": "k1",
        }
        created = (await http.post("/v1/jobs", json=body, headers=AUTH)).json()
        again = await http.post("/v1/jobs", json=body, headers=AUTH)
        assert again.status_code == 200
        assert again.json()["id"] == created["id"]
        assert created["metadata"] == {"chat": 42}

        async def pending():
            return (await http.get(f"/v1/jobs/{created['id']}", headers=AUTH)).json()[
                "state"
            ] == "pending"

        await wait_for(pending)
        listed = (await http.get("/v1/jobs", params={"state": "pending"}, headers=AUTH)).json()[
            "jobs"
        ]
        assert [j["id"] for j in listed] == [created["id"]]
        assert (await http.get("/v1/jobs", params={"state": "succeeded"}, headers=AUTH)).json()[
            "jobs"
        ] == []
        assert (
            await http.get("/v1/jobs", params={"state": "bogus"}, headers=AUTH)
        ).status_code == 400

        r = await http.get(f"/v1/jobs/{created['id']}", params={"wait": 0.2}, headers=AUTH)
        assert r.json()["state"] == "pending"  # wait returns what there is when it runs out
        r = await http.delete(f"/v1/jobs/{created['id']}", headers=AUTH)
        assert r.status_code == 200
        assert r.json()["state"] == "cancelled"
        assert r.json()["ended_by"] == "cancel"
        assert (await http.delete(f"/v1/jobs/{created['id']}", headers=AUTH)).status_code == 409

        for method in ("get", "delete"):
            r = await getattr(http, method)("/v1/jobs/nope", headers=AUTH)
            assert r.status_code == 404
            assert r.json()["error"] == "not found"
        assert (
            await http.get("/v1/jobs/x", params={"wait": "soon"}, headers=AUTH)
        ).status_code == 400
    await daemon.shutdown()


def _wait_healthy(url: str) -> None:
    wait_until(lambda: mode(url) == "ACTIVE")


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_finishes_every_job_with_its_original_deadline(tmp_path: Path):
    sim = kied(
        "simulate", "--port", "0", "--duration", "3", "--stuck", "0.5", "--seed", "5", env={}
    )
    daemons: list[subprocess.Popen[str]] = []
    try:
        sim_url = read_url(sim, stream="stdout")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "KIED_DATABASE_URL": str(tmp_path / "kied.db"),
            "KIE_BASE_URL": sim_url,
            "KIE_API_KEY": "k",
            "KIED_PUBLIC_URL": url,
            "KIED_CALLBACK_TOKEN": "cb",
        }
        daemons.append(kied("serve", "--port", str(port), env=env))
        _wait_healthy(url)
        jobs = []
        for i in range(8):
            r = httpx.post(
                f"{url}/v1/jobs",
                json={"model": "m", "input": {"prompt": str(i)}, "timeout_s": 6},
                timeout=5,
            )
            assert r.status_code == 201
            jobs.append(r.json())
        time.sleep(1.0)  # tasks created at KIE, none finished yet
        # Each deadline now counts from its createTask: moved by the job's wait to be sent.
        sent = [httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=5).json() for job in jobs]
        for job, now_sent in zip(jobs, sent, strict=True):
            assert now_sent["submission"]["count"] == 1
            assert now_sent["deadline_at"] >= job["deadline_at"]
        jobs = sent
        daemons[0].kill()  # kill -9: no cleanup at all
        daemons[0].wait(timeout=10)
        time.sleep(2.5)  # KIE finishes tasks and calls back while kied is down
        daemons.append(kied("serve", "--port", str(port), env=env))
        _wait_healthy(url)
        done = []
        for job in jobs:
            r = httpx.get(f"{url}/v1/jobs/{job['id']}", params={"wait": 30}, timeout=40)
            done.append(r.json())
    finally:
        for proc in [*daemons, sim]:
            stop(proc)
    states = [d["state"] for d in done]
    assert set(states) <= {"succeeded", "timed_out"}, done
    assert "succeeded" in states
    assert "timed_out" in states
    for before, after in zip(jobs, done, strict=True):
        assert after["deadline_at"] == before["deadline_at"]  # the clock was not restarted
        if after["state"] == "timed_out":
            assert (
                after["ended_at"] == after["deadline_at"]
                or after["ended_at"] >= after["deadline_at"]
            )
            ended = _ts(after["ended_at"])
            assert 0 <= ended - _ts(after["deadline_at"]) < 1.5
        else:
            assert after["ended_by"] in ("callback", "poll")


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
