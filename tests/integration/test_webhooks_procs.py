"""Signed webhooks from real `kied serve` processes to a real receiving HTTP server.

The receiver verifies every delivery with the reference ``standardwebhooks`` package, on
the real clock, as an application would. Retry delays are shortened
(``KIED_WEBHOOK_RETRY_SCHEDULE``) so that a receiver that fails for a while is tried
again within seconds.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.integration.test_one_task_per_job import Rig
from tests.procs import free_port, kied, read_url, stop, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"kied-procs-webhook-key-01234567").decode()


@dataclass
class Receiver:
    """An application's webhook endpoint that verifies what it gets."""

    status: int = 204
    verified: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def delivered(self) -> dict[str, list[dict[str, Any]]]:
        """Verified deliveries answered 2xx, by webhook-id."""
        with self.lock:
            found: dict[str, list[dict[str, Any]]] = {}
            for item in self.verified:
                if 200 <= item["status"] < 300:
                    found.setdefault(item["id"], []).append(item)
            return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    hook = Webhook(SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = hook.verify(body, headers)
            except Exception as exc:  # a forged or broken delivery
                with state.lock:
                    state.refused.append(str(exc))
                self.send_response(400)
                self.end_headers()
                return
            status = state.status
            with state.lock:
                state.verified.append(
                    {"id": headers["webhook-id"], "status": status, "payload": payload}
                )
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/kied-hooks?key=app-secret"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sim() -> Iterator[str]:
    proc = kied("simulate", "--port", "0", "--duration", "1", "--seed", "9")
    try:
        yield read_url(proc, stream="stdout")
    finally:
        stop(proc)


def webhook_env(receiver: Receiver) -> dict[str, str]:
    return {
        "KIED_WEBHOOK_URL": receiver.url,
        "KIED_WEBHOOK_SECRET": SECRET,
        "KIED_WEBHOOK_EVENTS": "all",
        "KIED_WEBHOOK_RETRY_SCHEDULE": "0,0.3,0.3,0.3,0.5,0.5,0.5,1,1,1,1,1,1,1,1,1,1,1,1,1",
    }


def event_types(receiver: Receiver) -> dict[str, list[str]]:
    by_job: dict[str, list[str]] = {}
    for items in receiver.delivered().values():
        payload = items[0]["payload"]
        by_job.setdefault(payload["data"]["id"], []).append(payload["type"])
    return by_job


def check_everything_once_in_spirit(receiver: Receiver, ids: list[str]) -> None:
    """Every job's events arrived verified; repeats of an event carry its id and body."""
    assert receiver.refused == []
    by_job = event_types(receiver)
    for job_id in ids:
        assert sorted(by_job[job_id]) == ["job.created", "job.submitted", "job.succeeded"]
    for items in receiver.delivered().values():
        assert all(item["payload"] == items[0]["payload"] for item in items)


def test_every_event_reaches_the_application_verified_sqlite(
    sim: str, receiver: Receiver, tmp_path: Path
) -> None:
    rig = Rig(sim_url=sim, database=str(tmp_path / "kied.db"), env=webhook_env(receiver))
    try:
        url = rig.start()
        rig.leader()
        ids = _submit(url, 5)
        rig.wait_jobs(url, ids)
        wait_until(lambda: len(receiver.delivered()) == 15, within_s=10)
        check_everything_once_in_spirit(receiver, ids)
    finally:
        for proc in rig.procs.values():
            stop(proc, signal.SIGKILL)


def _submit(url: str, n: int) -> list[str]:
    out = []
    for i in range(n):
        r = httpx.post(f"{url}/v1/jobs", json={"model": "m", "input": {"p": i}}, timeout=10)
        assert r.status_code == 201, r.text
        out.append(r.json()["id"])
    return out


def test_a_leader_killed_with_deliveries_pending_loses_no_event_postgres(
    sim: str, receiver: Receiver, pg_url: str
) -> None:
    receiver.status = 500  # the application is failing: deliveries pile up, pending
    rig = Rig(sim_url=sim, database=pg_url, env=webhook_env(receiver))
    try:
        standby_port = free_port()
        first = rig.start(public_port=standby_port)
        rig.leader()
        standby = rig.start(standby_port)
        ids = _submit(first, 10)
        rig.wait_jobs(standby, ids)
        wait_until(lambda: len({i["id"] for i in receiver.verified}) >= 30, within_s=15)
        stop(rig.procs.pop(first), signal.SIGKILL)
        assert rig.leader() == standby
        killed_at = time.monotonic()
        receiver.status = 204
        wait_until(lambda: len(receiver.delivered()) == 30, within_s=30)
        recovered_s = time.monotonic() - killed_at
        check_everything_once_in_spirit(receiver, ids)
        assert recovered_s < 15
        # what the receiver refused before is the same message, sent again
        tried = {i["id"]: i["payload"] for i in receiver.verified if i["status"] == 500}
        for event_id, payload in tried.items():
            assert receiver.delivered()[event_id][0]["payload"] == payload
        assert json.dumps(tried)  # bodies are plain JSON
    finally:
        for proc in rig.procs.values():
            stop(proc, signal.SIGKILL)
