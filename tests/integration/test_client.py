"""kied.client, the application's Python client: sync, async under trio, async under asyncio.

- Under trio, the daemon runs in this process (``start_daemon``) and kied's simulator on a
  real socket, on the wall clock with short task durations.
- The sync client and asyncio need the daemon elsewhere, since a blocking client (or another
  event loop) in this thread would hold up an in-process daemon: they run ``kied simulate``
  and ``kied serve`` as real processes.
- The routes' edges and the client's retries run in virtual time, in this process:
  ``app.test_client()`` or ``httpx.ASGITransport`` over ``MemoryStore``, and
  ``httpx.MockTransport``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from contextlib import aclosing, closing
from dataclasses import dataclass, replace
from datetime import UTC, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import httpx
import pytest
import trio

from kied.client import (
    AsyncClient,
    BadRequestError,
    CallbackRecord,
    Client,
    Event,
    Job,
    KiedClientError,
    NotFoundError,
    ServerError,
    UnauthorizedError,
)
from kied.daemon import Daemon
from kied.kie.simulator import SimulatorConfig, serve_simulator
from kied.settings import NoLockSettings, Settings, SqliteStoreSettings
from kied.testing import MemoryStore
from kied.web import create_app
from tests.conftest import wait_for
from tests.integration.test_daemon import market_callback
from tests.procs import free_port, kied, mode, read_url, stop, wait_until

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

TOKEN = "client-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ============================================================================================
# Under trio, against a daemon in this process


@pytest.fixture
async def simulator(nursery):
    async def start(**changes: Any) -> str:
        config = replace(SimulatorConfig(port=0, duration_s=(0.2, 0.2), seed=3), **changes)
        url: str = await nursery.start(serve_simulator, config)
        return url

    return start


@pytest.fixture
async def daemon_overrides(simulator):
    """Start a simulator; the daemon settings that point at it, on a port of its own."""

    async def start(**sim_changes: Any) -> dict[str, Any]:
        sim_url = await simulator(**sim_changes)
        port = free_port()
        return {
            "port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "kie_base_url": sim_url,
            "callback_token": "cb-secret",
            "api_token": TOKEN,
        }

    return start


@pytest.fixture
async def kied_api(settings, start_daemon, daemon_overrides):
    async def start(**sim_changes: Any):
        return await start_daemon(settings, **(await daemon_overrides(**sim_changes)))

    return start


async def test_async_client_under_trio_submits_waits_lists_and_cancels(kied_api):
    with trio.fail_after(30):
        daemon = await kied_api()
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            job = await client.submit(
                "google/nano-banana",
                {"prompt": "a red bicycle"},
                idempotency_key="order-17",
                metadata={"chat_id": 42},
            )
            assert isinstance(job, Job)
            assert (job.state, job.terminal, job.model, job.family) == (
                "submitting",
                False,
                "google/nano-banana",
                "market",
            )
            assert job.created_at is not None
            assert job.created_at.tzinfo is not None
            assert job.created_at.utcoffset() == timedelta(0)
            again = await client.submit(
                "google/nano-banana", {"prompt": "a red bicycle"}, idempotency_key="order-17"
            )
            assert again.id == job.id

            done = await client.wait(job.id, timeout=20)
            assert (done.state, done.terminal, done.ended_by) == ("succeeded", True, "callback")
            assert isinstance(done.result_urls, tuple)
            assert done.result_urls
            assert done.error is None
            assert done.metadata == {"chat_id": 42}
            assert done.idempotency_key == "order-17"
            assert done.submission is not None
            assert done.submission.count == 1
            assert done.task_id
            assert done.ended_at is not None
            assert done.raw["id"] == job.id
            assert (await client.get(job.id)).state == "succeeded"
            # Cancelling a job that has ended answers 409; the client returns the job.
            assert (await client.cancel(job.id)).state == "succeeded"
            assert job.id in [j.id for j in await client.list(state="succeeded")]

            # A task KIE has never heard of stays pending: waiting runs out, then cancel.
            tracked = await client.submit(family="veo", task_id="no-such-task")
            started = trio.current_time()
            still = await client.wait(tracked.id, timeout=0.5)
            assert trio.current_time() - started >= 0.5
            assert not still.terminal
            cancelled = await client.cancel(tracked.id)
            assert (cancelled.state, cancelled.ended_by) == ("cancelled", "cancel")
            listed = await client.list(state=["cancelled", "failed"])
            assert [j.id for j in listed] == [tracked.id]
        await daemon.shutdown()


async def test_errors_carry_the_api_message(kied_api):
    with trio.fail_after(30):
        daemon = await kied_api()
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            with pytest.raises(BadRequestError) as bad:
                await client.submit("m", {"prompt": "x"}, timeout_s=-1)
            assert bad.value.field == "timeout_s"
            assert bad.value.status == 400
            assert str(bad.value) == (
                "timeout_s: must be more than 0 and at most 30 days (HTTP 400 invalid request)"
            )
            with pytest.raises(BadRequestError, match=r"^input: must be a JSON object"):
                await client.submit("m")
            with pytest.raises(BadRequestError, match=r"^state: unknown state 'bogus'"):
                await client.list(state="bogus")
            long_key = "k" * 201
            with pytest.raises(BadRequestError) as bad:
                await client.list(metadata={long_key: "v"})
            assert bad.value.field == f"metadata.{long_key}"
            bad_calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("after", partial(client.events_page, -1)),
                ("limit", partial(client.events_page, 0, limit=0)),
                ("wait", partial(client.events_page, 0, wait=301)),
                ("limit", partial(client.callbacks, "nope", limit=5000)),
            ]
            for field, call in bad_calls:
                with pytest.raises(BadRequestError) as bad:
                    await call()
                assert bad.value.field == field

            lookups: list[Callable[[str], Awaitable[object]]] = [
                client.get,
                client.cancel,
                client.callbacks,
                partial(client.wait, timeout=1),
            ]
            for lookup in lookups:
                with pytest.raises(NotFoundError) as missing:
                    await lookup("nope")
                assert str(missing.value) == "no job 'nope' (HTTP 404 not found)"
                assert missing.value.status == 404

        async with AsyncClient(daemon.url, token="wrong") as stranger:
            with pytest.raises(UnauthorizedError) as denied:
                await stranger.list()
            assert "send Authorization: Bearer KIED_API_TOKEN (HTTP 401 unauthorized)" == str(
                denied.value
            )
            assert isinstance(denied.value, KiedClientError)
        await daemon.shutdown()

        async with AsyncClient(daemon.url, retries=1) as nowhere:
            with pytest.raises(
                ServerError, match=r"^cannot reach http://127\.0\.0\.1:\d+: "
            ) as down:
                await nowhere.get("x")
            assert down.value.status is None


async def test_the_metadata_filter_finds_jobs_by_every_key_given(kied_api):
    with trio.fail_after(30):
        daemon = await kied_api()
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            a = await client.submit("m", {}, metadata={"chat_id": 42, "lang": "en", "vip": True})
            b = await client.submit("m", {}, metadata={"chat_id": "42", "lang": "de"})
            c = await client.submit("m", {}, metadata={"chat_id": 7})
            await client.submit("m", {})

            async def ids(**metadata: Any) -> list[str]:
                return [j.id for j in await client.list(metadata=metadata)]

            assert await ids(chat_id="42") == [b.id, a.id]  # newest first
            assert await ids(chat_id=42) == [b.id, a.id]  # a number matches by its JSON text
            assert await ids(chat_id="42", lang="en") == [a.id]
            assert await ids(vip=True) == [a.id]
            assert await ids(chat_id=7) == [c.id]
            assert await ids(chat_id="nobody") == []
            assert [j.id for j in await client.list(metadata={"chat_id": "42"}, limit=1)] == [b.id]
            with_state = await client.list(state="cancelled", metadata={"chat_id": "42"})
            assert with_state == []
            # Several values for one key cannot all match: the daemon says so.
            async with httpx.AsyncClient(base_url=daemon.url, headers=AUTH) as http:
                r = await http.get("/v1/jobs?metadata.chat_id=42&metadata.chat_id=7")
                assert r.status_code == 400
                assert r.json()["field"] == "metadata.chat_id"
                r = await http.get("/v1/jobs?metadata.=42")
                assert (r.status_code, r.json()["field"]) == (400, "metadata.")
        await daemon.shutdown()


async def test_the_callback_trail_shows_what_kie_sent_and_what_it_did(kied_api):
    with trio.fail_after(30):
        daemon = await kied_api(duplicate_callbacks=1.0)
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            job = await client.submit("google/nano-banana", {"prompt": "twice"})
            done = await client.wait(job.id, timeout=20)
            assert done.state == "succeeded"

            async def both() -> list[CallbackRecord]:
                trail = await client.callbacks(job.id)
                return trail if len(trail) == 2 else []

            trail = await wait_for(both)
            assert trail[0].id > trail[1].id  # newest first
            assert [c.effect for c in trail] == ["no-op", "changed"]
            for record in trail:
                assert record.task_id == done.task_id
                assert record.outcome == "success"
                assert record.authenticated is True
                assert record.auth == "token"
                assert record.found_by
                assert record.problem is None
                assert record.received_at is not None
                assert record.received_at.tzinfo is not None
                assert record.body_size == len(record.body.encode())
                assert json.loads(record.body)["data"]["taskId"] == done.task_id
                assert (record.content_type or "").startswith("application/json")
            other = await client.submit(family="veo", task_id="never-calls-back")
            assert await client.callbacks(other.id) == []
        await daemon.shutdown()


async def test_events_resume_after_a_daemon_restart_and_come_once_in_order(
    settings, start_daemon, daemon_overrides, caplog
):
    overrides = await daemon_overrides()
    seen: list[Event] = []

    def succeeded(jobs: list[Job]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            done = {e.job.id for e in seen if e.type == "job.succeeded"}
            return all(j.id in done for j in jobs)

        return check

    async def caught_up() -> bool:
        return len(seen) >= len(log)

    with trio.fail_after(60):
        daemon = await start_daemon(settings, **overrides)
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            async with trio.open_nursery() as nursery:

                async def follow() -> None:
                    async with aclosing(client.events(wait=1)) as events:
                        async for event in events:
                            seen.append(event)

                nursery.start_soon(follow)
                first = [await client.submit("m", {"prompt": f"before {i}"}) for i in range(3)]
                await wait_for(succeeded(first), within_s=20)
                await daemon.shutdown()
                await trio.sleep(1.0)  # the follower fails to reach it meanwhile, and backs off
                daemon = await start_daemon(settings, **overrides)
                second = [await client.submit("m", {"prompt": f"after {i}"}) for i in range(3)]
                await wait_for(succeeded(second), within_s=20)
                log = await _whole_log(client)
                await wait_for(caught_up, within_s=10)
                nursery.cancel_scope.cancel()
        await daemon.shutdown()

    # The follower lost the daemon for a while, said so, and came back on its own.
    assert any(r.name == "kied.client" and "again in" in r.message for r in caplog.records)
    assert [e.cursor for e in seen] == [e.cursor for e in log]
    assert [e.id for e in seen] == [e.id for e in log]
    assert len({e.id for e in seen}) == len(seen)
    assert all(a.cursor < b.cursor for a, b in itertools.pairwise(seen))
    for job in [*first, *second]:
        mine = [e for e in seen if e.job.id == job.id]
        assert [e.type for e in mine] == ["job.created", "job.submitted", "job.succeeded"]
        # Each event carries the job as it stood when the event was written.
        assert [e.job.state for e in mine] == ["submitting", "pending", "succeeded"]
        assert all(e.created_at.tzinfo is not None for e in mine)


async def _whole_log(client: AsyncClient) -> list[Event]:
    log: list[Event] = []
    cursor = 0
    while True:
        page = await client.events_page(cursor, limit=1000)
        log.extend(page.events)
        if not page.events:
            return log
        cursor = page.next_cursor


async def test_events_as_server_sent_events_resume_after_last_event_id(kied_api):
    with trio.fail_after(30):
        daemon = await kied_api()
        async with AsyncClient(daemon.url, token=TOKEN) as client:
            job = await client.submit("m", {"prompt": "stream"})
            await client.wait(job.id, timeout=20)
            log = await _whole_log(client)
        assert len(log) == 3
        # httpx leaves a stream that is given up half-read to the garbage collector, so
        # this reads it with h11 over a socket it closes itself: the client going away.
        sock = await trio.open_tcp_stream("127.0.0.1", daemon.settings.port)
        http = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target="/v1/events?after=0",
            headers=[
                ("Host", "kied.test"),
                ("Authorization", f"Bearer {TOKEN}"),
                ("Accept", "text/event-stream"),
                ("Last-Event-ID", str(log[0].cursor)),
            ],
        )
        await sock.send_all(http.send(request) + http.send(h11.EndOfMessage()))
        body = b""
        while body.count(b"\n\n") < 3:  # the opening comment and two events
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await sock.receive_some())
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
                assert dict(event.headers)[b"content-type"].startswith(b"text/event-stream")
            elif isinstance(event, h11.Data):
                body += event.data
        await sock.aclose()
        frames = []
        for block in body.decode().split("\n\n"):
            lines = [line for line in block.splitlines() if not line.startswith(":")]
            if lines:
                frames.append(dict(line.split(": ", 1) for line in lines))
        assert [f["id"] for f in frames] == [str(e.cursor) for e in log[1:]]
        assert [f["event"] for f in frames] == [e.type for e in log[1:]]
        assert [json.loads(f["data"]) for f in frames] == [e.raw for e in log[1:]]
        await daemon.shutdown()


# ============================================================================================
# The sync client and asyncio, against real processes


@dataclass
class Stack:
    url: str
    log: list[str]


def _drain(pipe: Any, into: list[str]) -> None:
    for line in pipe:
        into.append(line)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real `kied simulate` (tasks of 0.2 s) and a real `kied serve` pointed at it."""
    tmp = tmp_path_factory.mktemp("client")
    sim = kied("simulate", "--port", "0", "--duration", "0.2", "--graceful-timeout", "0.5")
    procs: list[subprocess.Popen[str]] = [sim]
    log: list[str] = []
    try:
        sim_url = read_url(sim, stream="stdout")
        threading.Thread(target=_drain, args=(sim.stderr, []), daemon=True).start()
        threading.Thread(target=_drain, args=(sim.stdout, []), daemon=True).start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = kied(
            "serve",
            "--port",
            str(port),
            env={
                "KIE_BASE_URL": sim_url,
                "KIE_API_KEY": "test-key",
                "KIED_PUBLIC_URL": url,
                "KIED_API_TOKEN": TOKEN,
                "KIED_DATABASE_URL": str(tmp / "kied.db"),
            },
        )
        procs.append(serve)
        threading.Thread(target=_drain, args=(serve.stderr, log), daemon=True).start()
        threading.Thread(target=_drain, args=(serve.stdout, []), daemon=True).start()
        wait_until(lambda: mode(url) == "ACTIVE")
        yield Stack(url=url, log=log)
    finally:
        # The simulator first: the daemon would otherwise wait out its graceful timeout for
        # the simulator's idle keep-alive connections.
        for proc in procs:
            stop(proc)
    assert "Traceback" not in "".join(log)


@pytest.mark.slow
def test_sync_client(stack: Stack) -> None:
    with Client(stack.url, token=TOKEN, timeout=5) as client:
        job = client.submit("google/nano-banana", {"prompt": "sync"}, metadata={"test": "sync"})
        assert job.state == "submitting"
        done = client.wait(job.id, timeout=20)
        assert (done.state, done.ended_by) == ("succeeded", "callback")
        assert client.get(job.id).result_urls == done.result_urls
        assert [j.id for j in client.list(metadata={"test": "sync"})] == [job.id]
        assert [c.effect for c in client.callbacks(job.id)] == ["changed"]
        assert client.cancel(job.id).state == "succeeded"

        with closing(client.events(wait=5)) as events:
            mine = []
            for event in events:
                if event.job.id == job.id:
                    mine.append(event.type)
                    if event.type == "job.succeeded":
                        break
        assert mine == ["job.created", "job.submitted", "job.succeeded"]
        page = client.events_page(0, limit=1)
        assert len(page.events) == 1
        assert page.next_cursor == page.events[0].cursor

        with pytest.raises(BadRequestError) as bad:
            client.submit(family="dalle", input={})
        assert bad.value.field == "family"
        assert str(bad.value).startswith("family: must be one of market")
        with pytest.raises(NotFoundError, match=r"no job 'nope'"):
            client.wait("nope", timeout=1)
    with Client(stack.url) as anonymous, pytest.raises(UnauthorizedError):
        anonymous.list()


@pytest.mark.slow
def test_async_client_under_asyncio(stack: Stack) -> None:
    async def main() -> tuple[Job, list[str]]:
        async with AsyncClient(stack.url, token=TOKEN, timeout=httpx.Timeout(5)) as client:
            job = await client.submit("m/asyncio", {"prompt": "asyncio"}, metadata={"loop": "aio"})
            done = await client.wait(job.id, timeout=20)
            assert [j.id for j in await client.list(metadata={"loop": "aio"})] == [job.id]
            assert len(await client.callbacks(job.id)) == 1
            with pytest.raises(NotFoundError):
                await client.get("nope")

            async def follow() -> list[str]:
                mine = []
                async with aclosing(client.events(wait=5)) as events:
                    async for event in events:
                        if event.job.id == job.id:
                            mine.append(event.type)
                            if event.type == "job.succeeded":
                                return mine
                raise AssertionError("the events ended")

            types = await asyncio.wait_for(follow(), timeout=20)
        # Retries sleep through anyio, which asyncio runs as well as trio.
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", retries=1) as nowhere:
            started = time.monotonic()
            with pytest.raises(ServerError, match="cannot reach"):
                await nowhere.get("x")
            assert time.monotonic() - started >= 0.5
        return done, types

    done, types = asyncio.run(main())
    assert done.state == "succeeded"
    assert types == ["job.created", "job.submitted", "job.succeeded"]


# ============================================================================================
# The routes' edges in virtual time: the app over MemoryStore, in this process


def _app_settings(tmp_path: Path) -> Settings:
    return Settings(
        store=SqliteStoreSettings(path=tmp_path / "unused.db"),
        lock=NoLockSettings(),
        kie_base_url="http://127.0.0.1:9",
        kie_api_key="test-key",
        api_token=TOKEN,
    )


def _app(tmp_path: Path, store: MemoryStore | None = None) -> tuple[Any, Daemon]:
    config = _app_settings(tmp_path)
    daemon = Daemon(config, store=store or MemoryStore())
    app = create_app(callbacks=daemon.callbacks, jobs=daemon.jobs, status=daemon, settings=config)
    return app, daemon


def _in_process(app: Any) -> AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return AsyncClient("http://kied.test", token=TOKEN, transport=transport)


@pytest.mark.parametrize(
    ("query", "headers", "field"),
    [
        ("after=-1", {}, "after"),
        ("after=x", {}, "after"),
        ("limit=0", {}, "limit"),
        ("limit=1001", {}, "limit"),
        ("wait=300.5", {}, "wait"),
        ("wait=soon", {}, "wait"),
        ("wait=nan", {}, "wait"),
        ("", {"Accept": "text/event-stream", "Last-Event-ID": "abc"}, "Last-Event-ID"),
        ("", {"Accept": "text/event-stream", "Last-Event-ID": "-3"}, "Last-Event-ID"),
    ],
)
async def test_bad_event_requests_name_the_field(tmp_path, query, headers, field):
    app, _ = _app(tmp_path)
    r = await app.test_client().get(f"/v1/events?{query}", headers={**AUTH, **headers})
    assert r.status_code == 400
    body = await r.get_json()
    assert (body["error"], body["field"]) == ("invalid request", field)


async def test_callbacks_of_an_unknown_job_or_with_a_bad_limit(tmp_path):
    app, _ = _app(tmp_path)
    test = app.test_client()
    r = await test.get("/v1/jobs/nope/callbacks", headers=AUTH)
    assert r.status_code == 404
    assert (await r.get_json())["detail"] == "no job 'nope'"
    r = await test.get("/v1/jobs/nope/callbacks?limit=x", headers=AUTH)
    assert (r.status_code, (await r.get_json())["field"]) == (400, "limit")
    assert (await test.get("/v1/jobs/nope/callbacks")).status_code == 401


async def test_a_long_poll_for_events_waits_for_the_next_one(tmp_path, autojump_clock):
    app, _ = _app(tmp_path)
    async with _in_process(app) as client:
        started = trio.current_time()
        page = await client.events_page(0, wait=5)
        assert (page.events, page.next_cursor) == ((), 0)
        assert trio.current_time() - started == 5

        async def submit_later() -> None:
            await trio.sleep(2)
            await client.submit("m", {"prompt": "wake up"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit_later)
            started = trio.current_time()
            page = await client.events_page(0, wait=60)
        assert trio.current_time() - started == 2  # woken at once, not at the next re-read
        assert [e.type for e in page.events] == ["job.created"]
        assert page.next_cursor == page.events[0].cursor
        assert (await client.events_page(page.next_cursor)).events == ()


async def test_the_event_stream_keeps_alive_and_wakes_on_a_change(tmp_path, autojump_clock):
    app, _ = _app(tmp_path)
    headers = {**AUTH, "Accept": "text/event-stream"}
    # The stream never ends: leaving the cancel scope is how the client goes away.
    with trio.CancelScope() as gone:
        async with app.test_client().request("/v1/events", headers=headers) as stream:
            await stream.send_complete()
            assert await stream.receive() == b": kied events\n\n"
            started = trio.current_time()
            assert await stream.receive() == b": keep-alive\n\n"
            assert trio.current_time() - started == 15
            r = await app.test_client().post(
                "/v1/jobs", json={"model": "m", "input": {}, "metadata": {"n": 1}}, headers=AUTH
            )
            job = await r.get_json()
            chunk = (await stream.receive()).decode()
            assert trio.current_time() - started == 15  # at once
            gone.cancel()
    lines = chunk.splitlines()
    assert lines[0].startswith("id: ")
    assert lines[1] == "event: job.created"
    event = json.loads(lines[2].removeprefix("data: "))
    assert event["cursor"] == int(lines[0].removeprefix("id: "))
    assert event["job"]["id"] == job["id"]
    assert event["job"]["metadata"] == {"n": 1}
    assert chunk.endswith("\n\n")


async def test_the_callback_trail_shows_a_cut_body_and_bytes_that_are_not_utf8(tmp_path):
    app, _ = _app(tmp_path)
    test = app.test_client()
    json_body = {"content-type": "application/json"}
    async with _in_process(app) as client:
        job = await client.submit(family="veo", task_id="t-1")
        big = market_callback("t-1")[:-1] + b', "pad": "' + "é".encode() * 40_000 + b'"}'
        assert len(big) > 64 * 1024
        for body in (b"\xff\xfe names no task", big):
            r = await test.post("/callbacks/kie", data=body, headers=json_body)
            assert r.status_code == 200
        # The callback that names no task does not belong to the job's trail.
        (shown,) = await client.callbacks(job.id)
        assert shown.body_size == len(big)
        assert len(shown.body.encode()) <= 64 * 1024
        assert big.decode().startswith(shown.body)
        assert "\ufffd" not in shown.body  # the cut in the middle of an é is dropped
        assert shown.effect == "changed"
        assert shown.outcome == "success"
        assert shown.received_at is not None
        assert shown.received_at.tzinfo == UTC

        # A job still waiting for its task: the callback URL's ?job= names it.
        waiting = await client.submit("m", {})
        r = await test.post(f"/callbacks/kie?job={waiting.id}", data=b"\xff\xfe", headers=json_body)
        assert r.status_code == 200
        (record,) = await client.callbacks(waiting.id)
        assert record.body == "\ufffd\ufffd"
        assert record.problem
        assert record.body_size == 2


# ============================================================================================
# The client's own behaviour, through httpx.MockTransport in virtual time


JOB = {"id": "j-1", "state": "pending", "terminal": False, "family": "market", "model": "m"}


def _event(cursor: int, kind: str = "job.updated") -> dict[str, Any]:
    return {
        "cursor": cursor,
        "id": f"evt_{cursor}",
        "type": kind,
        "created_at": "2026-11-28T17:00:00.000Z",
        "job": JOB,
    }


class Script:
    """A MockTransport handler that plays answers (or raises) in order, and records requests."""

    def __init__(
        self, *answers: httpx.Response | Exception, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.answers = list(answers)
        self.clock = clock
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(self.clock())
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _mock(script: Script, **kw: Any) -> AsyncClient:
    return AsyncClient("http://kied.test", transport=httpx.MockTransport(script), **kw)


async def test_results_are_parsed_tolerantly(autojump_clock):
    odd = {
        **JOB,
        "created_at": "2026-11-28T17:00:00.000Z",
        "deadline_at": "not a time",
        "result_urls": ["https://a", 3],
        "error": {"code": "500", "message": "boom", "extra": 1},
        "a_field_from_the_future": {"x": 1},
    }
    script = Script(httpx.Response(200, json=odd))
    async with _mock(script) as client:
        job = await client.get("j-1")
    assert job.raw["a_field_from_the_future"] == {"x": 1}
    assert job.result_urls == ("https://a",)
    assert job.deadline_at is None
    assert job.created_at is not None
    assert job.created_at.tzinfo is not None
    assert job.error is not None
    assert (job.error.code, job.error.message) == ("500", "boom")
    assert (job.submission, job.metadata, job.other_task_ids) == (None, None, ())
    assert script.requests[0].headers.get("authorization") is None


async def test_reads_are_retried_with_backoff_and_a_keyless_submit_is_not(autojump_clock):
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(503, text="restarting"),
        httpx.Response(200, json=JOB),
    )
    async with _mock(script, token="t") as client:
        started = trio.current_time()
        assert (await client.get("j-1")).id == "j-1"
    assert [t - started for t in script.times] == [0, 0.5, 1.5]
    assert script.requests[0].headers["authorization"] == "Bearer t"

    # A submit that may have arrived is not sent again without an idempotency key...
    script = Script(httpx.ReadError("reset"), httpx.Response(201, json=JOB))
    async with _mock(script) as client:
        with pytest.raises(ServerError, match=r"^cannot reach http://kied\.test"):
            await client.submit("m", {})
    assert len(script.requests) == 1
    # ...but one that surely did not is, and a keyed one always is.
    script = Script(
        httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.Response(201, json=JOB)
    )
    async with _mock(script) as client:
        await client.submit("m", {}, idempotency_key="k")
    assert len(script.requests) == 3
    assert json.loads(script.requests[2].content)["idempotency_key"] == "k"

    # A 500 is the daemon's own failure: not retried; the retries run out on 502.
    script = Script(httpx.Response(500, json={"error": "internal error", "detail": "see log"}))
    async with _mock(script) as client:
        with pytest.raises(ServerError) as failed:
            await client.get("j-1")
    assert (str(failed.value), failed.value.status) == ("see log (HTTP 500 internal error)", 500)
    script = Script(*[httpx.Response(502, text="<html>bad gateway</html>")] * 3)
    async with _mock(script) as client:
        with pytest.raises(ServerError, match=r"^HTTP 502: <html>bad gateway</html>$"):
            await client.get("j-1")
    assert len(script.requests) == 3


async def test_an_answer_that_is_not_kied_is_a_server_error(autojump_clock):
    script = Script(httpx.Response(200, text="<html>hello</html>"), httpx.Response(200, json={}))
    async with _mock(script) as client:
        with pytest.raises(ServerError, match="did not answer like kied"):
            await client.get("j-1")
        with pytest.raises(ServerError, match="did not answer like kied"):
            await client.get("j-1")


async def test_wait_long_polls_in_rounds_of_at_most_300_s(autojump_clock):
    rounds: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        wait_s = float(request.url.params["wait"])
        rounds.append(request.url.params["wait"])
        await trio.sleep(wait_s)  # the daemon holds the request, the job still running
        return httpx.Response(200, json=JOB)

    transport = httpx.MockTransport(handler)
    async with AsyncClient("http://kied.test", transport=transport) as client:
        started = trio.current_time()
        job = await client.wait("j-1", timeout=700)
    assert rounds == ["300", "300", "100"]
    assert trio.current_time() - started == 700
    assert not job.terminal


async def test_events_reconnect_with_backoff_and_give_each_event_once(autojump_clock):
    script = Script(
        httpx.Response(200, json={"events": [_event(1), _event(2)], "next_cursor": 2}),
        httpx.ConnectError("refused"),
        httpx.Response(500, json={"error": "internal error", "detail": "db"}),
        httpx.ReadError("reset"),
        # An answer that repeats an event already given: it is not given again.
        httpx.Response(200, json={"events": [_event(2), _event(3)], "next_cursor": 3}),
        httpx.Response(200, json={"events": [], "next_cursor": 3}),
        httpx.Response(401, json={"error": "unauthorized", "detail": "send the token"}),
    )
    seen: list[int] = []

    async def follow(client: AsyncClient) -> None:
        async with aclosing(client.events(after=0, wait=30, limit=50)) as events:
            async for event in events:
                seen.append(event.cursor)

    async with _mock(script) as client:
        with pytest.raises(UnauthorizedError, match="send the token"):
            await follow(client)
    assert seen == [1, 2, 3]
    afters = [r.url.params["after"] for r in script.requests]
    assert afters == ["0", "2", "2", "2", "2", "3", "3"]
    assert script.requests[0].url.params["limit"] == "50"
    assert script.requests[0].url.params["wait"] == "30"
    gaps = [b - a for a, b in zip(script.times, script.times[1:], strict=False)]
    assert gaps == [0, 0.5, 1.0, 2.0, 0, 0]  # back-off after each failure, reset on success


def test_a_url_that_is_not_http_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="must be http:// or https://"):
        Client("localhost:8080")
    with pytest.raises(ValueError, match="must be http:// or https://"):
        AsyncClient("ftp://kied.test")


@pytest.mark.slow
def test_the_sync_client_retries_and_reconnects_too() -> None:
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(200, json=JOB),
        httpx.Response(200, json={"events": [_event(1)], "next_cursor": 1}),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"events": [_event(1), _event(2)], "next_cursor": 2}),
        httpx.Response(409, json={"error": "job already ended", "job": {**JOB, "state": "failed"}}),
        clock=time.monotonic,
    )
    transport = httpx.MockTransport(script)
    with Client("http://kied.test", transport=transport, token="t") as client:
        assert client.get("j-1").id == "j-1"
        with closing(client.events(wait=0)) as events:
            cursors = [next(events).cursor, next(events).cursor]
        assert cursors == [1, 2]
        assert client.cancel("j-1").state == "failed"
    gaps = [b - a for a, b in itertools.pairwise(script.times)]
    assert gaps[0] >= 0.5  # the retry's back-off
    assert gaps[3] >= 0.5  # the reconnect's back-off
    afters = [r.url.params.get("after") for r in script.requests]
    assert afters == [None, None, "0", "1", "1", None]
    assert all(r.headers["authorization"] == "Bearer t" for r in script.requests)
