"""A stop with clients connected: idle keep-alive connections do not hold it, a request in
flight still gets its answer, long polls and event streams answer at once.

The SIGTERM tests run real ``kied serve`` processes with the default graceful timeout (5 s)
and are timed on the wall clock.
"""

from __future__ import annotations

import json
import socket
import time
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from kied.settings import load_settings
from kied.store import open_store
from tests.procs import kied, read_url, stop

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

#: what a stop with idle connections may take, SIGTERM to exit
FAST_STOP_S = 0.5


def test_the_default_graceful_timeout_is_kept():
    # The bounds below mean something only if the drain could take far longer.
    assert load_settings({}, pid=1).graceful_timeout_s == 5.0


def _serve(tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    proc = kied("serve", "--port", "0", env={"KIED_DATABASE_URL": str(tmp_path / "kied.db")})
    return proc, read_url(proc)


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


def _read_answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length: its status line, headers and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a body"
        body += chunk
    return status, headers, body


def _idle_connection(url: str) -> socket.socket:
    sock = socket.create_connection(_address(url), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: kied\r\n\r\n")
    status, headers, _ = _read_answer(sock)
    assert status.startswith("HTTP/1.1 200")
    assert headers.get("connection") != "close"
    return sock


def _timed_stop(proc: subprocess.Popen[str]) -> float:
    t0 = time.monotonic()
    assert stop(proc) == 0
    return time.monotonic() - t0


@pytest.mark.slow
def test_sigterm_with_idle_keep_alive_connections_exits_at_once(tmp_path):
    proc, url = _serve(tmp_path)
    socks = [_idle_connection(url) for _ in range(20)]
    try:
        time.sleep(0.1)  # every answer sent: the connections are idle
        took = _timed_stop(proc)
        assert took < FAST_STOP_S, f"SIGTERM to exit took {took:.2f} s"
        for sock in socks:
            assert sock.recv(1) == b"", "an idle connection was left open"
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_sigterm_with_idle_http2_connections_exits_at_once(tmp_path):
    proc, url = _serve(tmp_path)
    clients = [httpx.Client(http1=False, http2=True, timeout=5) for _ in range(5)]
    try:
        for client in clients:
            r = client.get(f"{url}/healthz")
            assert r.status_code == 200
            assert r.http_version == "HTTP/2"
        time.sleep(0.1)
        took = _timed_stop(proc)
        assert took < FAST_STOP_S, f"SIGTERM to exit took {took:.2f} s"
    finally:
        for client in clients:
            client.close()


@pytest.mark.slow
def test_a_request_in_flight_at_sigterm_gets_its_answer_and_then_its_connection_closes(
    tmp_path,
):
    proc, url = _serve(tmp_path)
    idle = _idle_connection(url)
    body = json.dumps({"model": "google/nano-banana", "input": {"prompt": "late"}}).encode()
    sock = socket.create_connection(_address(url), timeout=10)
    try:
        # Headers and half the body: the request is being handled when SIGTERM comes.
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: kied\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.terminate()
        time.sleep(1.0)  # longer than any stop with only idle connections
        assert proc.poll() is None, "the stop did not wait for the request in flight"
        assert idle.recv(1) == b"", "the idle connection was kept while stopping"
        sock.sendall(body[10:])
        status, headers, answer = _read_answer(sock)
        assert status.startswith("HTTP/1.1 201"), (status, answer)
        assert json.loads(answer)["state"] == "submitting"
        # The client is told not to reuse the connection, and the server closes it.
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""
        assert stop(proc) == 0
        assert time.monotonic() - t0 < 1.0 + FAST_STOP_S + 1.0
    finally:
        sock.close()
        idle.close()
        if proc.poll() is None:
            stop(proc)


async def test_a_long_poll_answers_at_once_when_the_daemon_stops(settings, start_daemon):
    daemon = await start_daemon(settings)
    async with daemon.client() as http:
        created = await http.post("/v1/jobs", json={"model": "m", "input": {"prompt": "x"}})
        job_id = created.json()["id"]
        answers: dict[str, httpx.Response] = {}

        async def long_poll(name: str, path: str, params: dict[str, object]) -> None:
            answers[name] = await http.get(path, params=params)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll, "job", f"/v1/jobs/{job_id}", {"wait": 120})
            nursery.start_soon(long_poll, "events", "/v1/events", {"after": 10**6, "wait": 120})
            await trio.sleep(0.3)
            assert not answers
            t0 = time.monotonic()
            daemon.stop.set()
        took = time.monotonic() - t0
    assert answers["job"].status_code == 200
    assert answers["job"].json()["state"] == "submitting"
    assert answers["job"].headers["connection"] == "close"
    assert answers["events"].status_code == 200
    assert answers["events"].json()["events"] == []
    # Well inside the 5-s graceful timeout that would otherwise cut both off.
    assert took < 1.0
    with trio.fail_after(5):
        await daemon.done.wait()


async def test_an_event_stream_ends_when_the_daemon_stops(settings, start_daemon):
    daemon = await start_daemon(settings)
    async with daemon.client() as http:
        await http.post("/v1/jobs", json={"model": "m", "input": {"prompt": "x"}})
        received = b""
        stopped_at: float | None = None
        with trio.fail_after(3):
            async with http.stream(
                "GET", "/v1/events", headers={"Accept": "text/event-stream"}
            ) as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
                    if b"event: " in received and stopped_at is None:
                        # The stream has caught up: stop while it waits for more.
                        await trio.sleep(0.2)
                        stopped_at = time.monotonic()
                        daemon.stop.set()
    # The stream ended (the loop above returned) well inside the graceful timeout.
    assert stopped_at is not None
    assert time.monotonic() - stopped_at < 1.0


async def test_a_stop_records_where_listening_ended(settings, start_daemon):
    # The span ends when the stop began, not at the last heartbeat (every 5 s): a new
    # instance that began listening meanwhile finds no gap, and makes no catch-up.
    daemon = await start_daemon(settings)
    await trio.sleep(1.0)  # past the first heartbeat (at the start)
    stopped_at = time.time()
    await daemon.shutdown()
    async with open_store(settings.store) as store:
        spans = await store.listening_spans(after=0.0)
    assert len(spans) == 1
    assert stopped_at - 0.1 <= spans[0].until <= time.time()
