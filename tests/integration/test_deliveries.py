"""Webhook deliveries seen and sent again: ``GET /v1/deliveries``,
``POST /v1/deliveries/redeliver``, ``kied deliveries``/``kied redeliver`` and the client's
``deliveries()``/``redeliver()``.

End to end, the daemon runs in this process on a real socket with kied's simulator (tasks
of 0.2 s), and the application's endpoint is a small HTTP server in a thread that answers
what the test says (500, 410, then 204), or a port nothing listens on. A retry schedule of
``(0, 0.2)`` makes a failing delivery a dead letter within half a second of real time. The
command line runs in a worker thread (``kied.cli.main``), so the daemon in this process
goes on answering. The routes' edges run over ``MemoryStore`` with ``app.test_client()``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from standardwebhooks import Webhook

from kied import cli
from kied.client import (
    AsyncClient,
    BadRequestError,
    DeliveryAttemptRecord,
    DeliveryRecord,
    Event,
)
from kied.core.jobs import JobId
from kied.daemon import Daemon
from kied.kie.simulator import SimulatorConfig, serve_simulator
from kied.settings import NoLockSettings, Settings, SqliteStoreSettings
from kied.store import DeliveryAttempt, DeliveryState, NewDelivery
from kied.testing import MemoryStore
from kied.web import create_app
from tests.conftest import wait_for
from tests.procs import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TOKEN = "deliveries-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = b"kied-test-webhook-key-0123456789"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
#: rides in the endpoints' query strings: it must never be shown
QUERY_SECRET = "q-s3cr3t-Zx81"


# ============================================================================================
# The application's endpoint, and a daemon that tells it


@dataclass
class Receiver:
    """An endpoint in a thread: verifies each delivery, answers ``status``."""

    status: int = 204
    got: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks?token={QUERY_SECRET}"

    @property
    def shown(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks?…"

    def answers(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(event_id, status) for event_id, status, _ in self.got]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    hook = Webhook(SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            payload = hook.verify(body, headers)  # raises on a bad signature: a 500 below
            with state.lock:
                status = state.status
                state.got.append((headers["webhook-id"], status, payload))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def webhook_daemon(nursery, settings, start_daemon):
    """A simulator, and a daemon pointed at it that sends webhooks to ``endpoints``."""

    async def start(*endpoints: str):
        config = SimulatorConfig(port=0, duration_s=(0.2, 0.2), seed=5)
        sim_url: str = await nursery.start(serve_simulator, config)
        port = free_port()
        return await start_daemon(
            settings,
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            kie_base_url=sim_url,
            callback_token="cb-secret",
            api_token=TOKEN,
            webhook_urls=endpoints,
            webhook_keys=(KEY,),
            webhook_schedule_s=(0.0, 0.2),
        )

    return start


async def kied_cli(*args: str) -> int:
    """``kied ARGS`` in a worker thread: the daemon in this process goes on meanwhile."""
    status: int = await trio.to_thread.run_sync(cli.main, list(args))
    return status


async def settled(client: AsyncClient, event_id: str, states: set[str]) -> list[DeliveryRecord]:
    """The event's deliveries once every one is in one of ``states``."""

    async def check() -> list[DeliveryRecord]:
        found = await client.deliveries(event_id=event_id)
        return found if found and all(d.state in states for d in found) else []

    result: list[DeliveryRecord] = await wait_for(check, within_s=5)
    return result


# ============================================================================================
# End to end


@pytest.mark.slow
async def test_failed_deliveries_are_shown_without_secrets_and_sent_again(webhook_daemon, receiver):
    receiver.status = 500
    # A second endpoint where nothing listens: no answer at all.
    dead_port = free_port()
    dead = f"http://127.0.0.1:{dead_port}/gone?key={QUERY_SECRET}"
    started = time.monotonic()
    with trio.fail_after(15):
        daemon = await webhook_daemon(receiver.url, dead)
        async with (
            AsyncClient(daemon.url, token=TOKEN) as client,
            httpx.AsyncClient(base_url=daemon.url, headers=AUTH) as http,
        ):
            job = await client.submit("m", {"prompt": "tell the app"})
            assert (await client.wait(job.id, timeout=10)).state == "succeeded"
            t_done = datetime.now(UTC)
            event = await _ending(client, job.id)
            failed = await settled(client, event.id, {"failed"})

            r = await http.get("/v1/deliveries", params={"state": "failed"})
            assert r.status_code == 200
            assert QUERY_SECRET not in r.text
            answer = r.json()
            assert answer["disabled_endpoints"] == {}
            by_endpoint = {d["endpoint"]: d for d in answer["deliveries"]}
            assert set(by_endpoint) == {receiver.shown, f"http://127.0.0.1:{dead_port}/gone?…"}
            app = by_endpoint[receiver.shown]
            assert set(app) == {
                "id", "event_id", "type", "job_id", "endpoint", "state", "attempts",
                "next_attempt_at", "created_at", "updated_at", "delivered_at", "last_status",
                "last_error", "history",
            }  # fmt: skip
            assert (app["event_id"], app["type"], app["job_id"]) == (event.id, event.type, job.id)
            assert (app["state"], app["attempts"], app["last_status"], app["last_error"]) == (
                "failed",
                2,
                500,
                "HTTP 500",
            )
            assert (app["next_attempt_at"], app["delivered_at"]) == (None, None)
            assert app["created_at"].endswith("Z")
            assert [(h["status_code"], h["error"]) for h in app["history"]] == [
                (500, "HTTP 500"),
                (500, "HTTP 500"),
            ]
            assert all(h["attempted_at"].endswith("Z") for h in app["history"])
            assert all(h["duration_ms"] >= 0 for h in app["history"])
            gone = by_endpoint[f"http://127.0.0.1:{dead_port}/gone?…"]
            assert (gone["attempts"], gone["last_status"]) == (2, None)
            assert "ConnectError" in gone["last_error"]
            assert [h["status_code"] for h in gone["history"]] == [None, None]
            # The receiver got the same webhook twice, signed, and refused it.
            assert receiver.answers() == [(event.id, 500), (event.id, 500)]

            # The client: the same, typed.
            assert len(failed) == 2
            mine = next(d for d in failed if d.endpoint == receiver.shown)
            assert isinstance(mine, DeliveryRecord)
            assert (mine.id, mine.state, mine.attempts, mine.last_status) == (
                app["id"],
                "failed",
                2,
                500,
            )
            assert mine.job_id == job.id
            assert mine.created_at is not None
            assert mine.created_at.tzinfo is not None
            assert all(isinstance(a, DeliveryAttemptRecord) for a in mine.history)
            assert [a.status_code for a in mine.history] == [500, 500]
            assert mine.raw == app
            # Filters: newest first, by state, event, time and count.
            everything = await client.deliveries()
            assert [d.id for d in everything] == sorted((d.id for d in everything), reverse=True)
            assert await client.deliveries(state="delivered") == []
            assert len(await client.deliveries(since=t_done - timedelta(minutes=1))) == 2
            assert len(await client.deliveries(since=time.time() - 60)) == 2
            assert await client.deliveries(since=(t_done + timedelta(hours=1)).isoformat()) == []
            assert len(await client.deliveries(limit=1)) == 1
            assert await client.deliveries(event_id="evt_nope") == []

            # The application is back: its delivery is sent again and delivered.
            receiver.status = 204
            assert await client.redeliver(event_id=event.id) == 2
            await wait_for(lambda: _delivered(client, event.id, receiver.shown), within_s=5)
            [again] = [
                d for d in await client.deliveries(event_id=event.id) if d.endpoint == mine.endpoint
            ]
            assert (again.id, again.state, again.attempts, again.last_status) == (
                mine.id,
                "delivered",
                1,
                204,
            )
            assert again.delivered_at is not None
            assert [a.status_code for a in again.history] == [500, 500, 204]
            assert receiver.answers()[-1] == (event.id, 204)
            # The other one is tried again, and fails again.
            both = await settled(client, event.id, {"failed", "delivered"})
            [dead_again] = [d for d in both if d.id != mine.id]
            assert (dead_again.state, dead_again.attempts, len(dead_again.history)) == (
                "failed",
                2,
                4,
            )

            with pytest.raises(BadRequestError) as bad:
                await client.redeliver()
            assert bad.value.field == "event_id"
            with pytest.raises(BadRequestError) as bad:
                await client.redeliver(event_id=event.id, failed_since=0)
            assert bad.value.field == "failed_since"
            with pytest.raises(BadRequestError) as bad:
                await client.deliveries(state="lost")
            assert bad.value.field == "state"
            with pytest.raises(BadRequestError) as bad:
                await client.deliveries(since="yesterday")
            assert bad.value.field == "since"
        await daemon.shutdown()
    assert time.monotonic() - started < 5


async def _ending(client: AsyncClient, job_id: str) -> Event:
    """The event that told of the job's end (the one webhooks send by default)."""
    page = await client.events_page(0)
    [event] = [e for e in page.events if e.job.id == job_id and e.type == "job.succeeded"]
    return event


async def _delivered(client: AsyncClient, event_id: str, endpoint: str) -> bool:
    found = await client.deliveries(event_id=event_id)
    return any(d.endpoint == endpoint and d.state == "delivered" for d in found)


@pytest.mark.slow
async def test_the_cli_shows_a_disabled_endpoint_and_sends_again(webhook_daemon, receiver, capsys):
    receiver.status = 410
    started = time.monotonic()
    with trio.fail_after(15):
        daemon = await webhook_daemon(receiver.url)
        flags = ("--url", daemon.url, "--token", TOKEN)
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            job = await client.submit("m", {"prompt": "gone"})
            assert (await client.wait(job.id, timeout=10)).state == "succeeded"
            event = await _ending(client, job.id)
            await settled(client, event.id, {"failed"})
        capsys.readouterr()

        assert await kied_cli("deliveries", "--failed", *flags) == 0
        out, err = capsys.readouterr()
        assert err == ""
        assert QUERY_SECRET not in out
        lines = out.splitlines()
        assert lines[0].split() == [
            "EVENT", "TYPE", "ENDPOINT", "STATE", "ATTEMPTS", "LAST", "NEXT", "ATTEMPT"
        ]  # fmt: skip
        row = [event.id, "job.succeeded", receiver.shown, "failed", "1", "HTTP", "410", "-"]
        assert lines[1].split() == row
        assert lines[2:] == [
            "",
            "disabled endpoints (kied redeliver enables an endpoint again):",
            f"  {receiver.shown}  the endpoint answered 410 Gone",
        ]

        assert await kied_cli("deliveries", "--json", "--since", "-5m", *flags) == 0
        out, _ = capsys.readouterr()
        assert QUERY_SECRET not in out
        answer = json.loads(out)
        assert [d["event_id"] for d in answer["deliveries"]] == [event.id]
        assert answer["disabled_endpoints"] == {receiver.shown: "the endpoint answered 410 Gone"}

        assert await kied_cli("deliveries", "--state", "lost", *flags) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("kied: state: unknown state 'lost'")

        # The endpoint is fixed: every dead letter of the last hour is sent again.
        receiver.status = 204
        assert await kied_cli("redeliver", "--failed", "--since", "-1h", *flags) == 0
        out, err = capsys.readouterr()
        assert err == ""
        assert out.startswith("sent again: 1 failed delivery made since ")
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            await settled(client, event.id, {"delivered"})

        assert await kied_cli("deliveries", "--event", event.id, *flags) == 0
        out, _ = capsys.readouterr()
        _, row_text = out.splitlines()  # no disabled endpoint any more
        assert row_text.split()[3:] == ["delivered", "1", "204", "-"]

        assert await kied_cli("redeliver", event.id, *flags) == 0
        assert capsys.readouterr().out == f"sent again: 1 delivery of event {event.id}\n"
        assert await kied_cli("redeliver", "evt_nope", *flags) == 0
        assert capsys.readouterr().out == "nothing sent again: no delivery of event evt_nope\n"
        assert await kied_cli("deliveries", "--event", "evt_nope", *flags) == 0
        assert capsys.readouterr().out == "no delivery\n"
        assert receiver.answers()[0] == (event.id, 410)
        await daemon.shutdown()
    assert time.monotonic() - started < 5


# ============================================================================================
# In this process: the routes' edges over MemoryStore, and the command line's usage


def _app(tmp_path: Path, store: MemoryStore) -> Any:
    config = Settings(
        store=SqliteStoreSettings(path=tmp_path / "unused.db"),
        lock=NoLockSettings(),
        kie_base_url="http://127.0.0.1:9",
        kie_api_key="test-key",
        api_token=TOKEN,
    )
    daemon = Daemon(config, store=store)
    return create_app(callbacks=daemon.callbacks, jobs=daemon.jobs, status=daemon, settings=config)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=lost", "state"),
        ("since=soon", "since"),
        ("since=nan", "since"),
        ("since=2026-13-01", "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
    ],
)
async def test_bad_delivery_queries_name_the_field(tmp_path, query, field):
    test = _app(tmp_path, MemoryStore()).test_client()
    r = await test.get(f"/v1/deliveries?{query}", headers=AUTH)
    assert r.status_code == 400
    body = await r.get_json()
    assert (body["error"], body["field"]) == ("invalid request", field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "event_id"),
        ({"event_id": "evt_1", "failed_since": 0}, "failed_since"),
        ({"event_id": 3}, "event_id"),
        ({"event_id": " "}, "event_id"),
        ({"failed_since": "yesterday"}, "failed_since"),
        ({"failed_since": True}, "failed_since"),
        ({"failed_since": [1]}, "failed_since"),
        ({"failed_since": 0, "endpoint": "x"}, "endpoint"),
        ([1], "body"),
        ("not json", "body"),
    ],
)
async def test_bad_redeliveries_name_the_field(tmp_path, body, field):
    test = _app(tmp_path, MemoryStore()).test_client()
    if body == "not json":
        r = await test.post("/v1/deliveries/redeliver", data=b"{nope", headers=AUTH)
    else:
        r = await test.post("/v1/deliveries/redeliver", json=body, headers=AUTH)
    assert r.status_code == 400
    answer = await r.get_json()
    assert (answer["error"], answer["field"]) == ("invalid request", field)


async def test_the_delivery_routes_want_the_token_and_take_iso_or_epoch_times(tmp_path):
    store = MemoryStore()
    test = _app(tmp_path, store).test_client()
    assert (await test.get("/v1/deliveries")).status_code == 401
    assert (await test.post("/v1/deliveries/redeliver", json={"event_id": "e"})).status_code == 401
    for since in ("1767225600", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "2026-01-01"):
        r = await test.get(f"/v1/deliveries?since={since}", headers=AUTH)
        assert r.status_code == 200, since
    for failed_since in (0, 1767225600.5, "2026-01-01T01:00:00+01:00"):
        r = await test.post(
            "/v1/deliveries/redeliver", json={"failed_since": failed_since}, headers=AUTH
        )
        assert (r.status_code, await r.get_json()) == (200, {"redelivered": 0})


async def test_secrets_in_an_endpoint_never_show(tmp_path):
    store = MemoryStore()
    endpoint = "https://hook-user:pa55word@app.test:8443/kied/hook?sig=QSECRET&x=1#frag"
    await store.enqueue_deliveries(
        [
            NewDelivery(
                event_id="evt_1",
                event_cursor=1,
                job_id=JobId("j-1"),
                type="job.failed",
                endpoint=endpoint,
                body="{}",
                created_at=1767225600.0,
            )
        ],
        cursor=1,
    )
    [delivery] = await store.list_deliveries()
    # An error that quotes the URL, as some network errors do.
    await store.record_attempt(
        DeliveryAttempt(
            delivery_id=delivery.id,
            attempted_at=1767225601.0,
            status_code=None,
            duration_s=0.25,
            error=f"ConnectError: cannot reach {endpoint}",
        ),
        state=DeliveryState.FAILED,
        next_attempt_at=None,
    )
    await store.disable_endpoint(endpoint, reason=f"{endpoint} answered 410", now=1767225602.0)
    test = _app(tmp_path, store).test_client()
    r = await test.get("/v1/deliveries", headers=AUTH)
    text = await r.get_data(as_text=True)
    for secret in ("QSECRET", "pa55word", "hook-user", "frag"):
        assert secret not in text
    answer = json.loads(text)
    shown = "https://app.test:8443/kied/hook?…"
    [d] = answer["deliveries"]
    assert d["endpoint"] == shown
    assert d["last_error"] == d["history"][0]["error"]
    assert d["history"][0] == {
        "attempted_at": "2026-01-01T00:00:01.000Z",
        "status_code": None,
        "duration_ms": 250.0,
        "error": f"ConnectError: cannot reach {shown}",
    }
    assert answer["disabled_endpoints"] == {shown: f"{shown} answered 410"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["redeliver"], "kied redeliver: give EVENT_ID, or --failed --since T"),
        (["redeliver", "evt_1", "--failed"], "kied redeliver: give EVENT_ID or --failed --since T"),
        (["redeliver", "--failed"], "kied redeliver: --failed needs --since T (--since 0 for"),
        (["redeliver", "--since", "-1h"], "kied redeliver: give EVENT_ID, or --failed --since T"),
        (["redeliver", "--failed", "--since", "soon"], "argument --since: must be epoch seconds"),
        (["deliveries", "--failed", "--state", "failed"], "argument --state: not allowed with"),
        (["deliveries", "--since", "-2x"], "argument --since: must be epoch seconds"),
        (["deliveries", "--limit", "0"], "argument --limit: must be 1 or more"),
        (["deliveries", "--url", "ftp://x"], "kied: --url: must be an http"),
    ],
)
def test_delivery_command_usage_errors_are_one_line_and_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert expected in " ".join(captured.err.split())
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


def test_kied_help_lists_the_delivery_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "\n  deliveries  " in out
    assert "\n  redeliver   " in out
