"""Result files kept by kied: the real daemon, kied's simulator and small file servers on
127.0.0.1; downloads are checked byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from kied.archive import DirArchive
from kied.archiver import Archiver
from kied.changes import JobChanges
from kied.core.jobs import ArchiveState, EndedBy, EventKind, Job, JobId, JobState, Report
from kied.core.schedule import CallbackHealth
from kied.kie.simulator import SimulatorConfig, serve_simulator
from kied.metrics import Metrics
from kied.settings import DirArchiveSettings, PostgresStoreSettings, S3ArchiveSettings
from kied.testing import MemoryStore, make_new_job
from tests.conftest import PYTHON, wait_for
from tests.procs import free_port, kied, mode, read_url, stop, wait_until

if TYPE_CHECKING:
    from kied.settings import Settings
    from tests.conftest import DaemonStarter, RunningDaemon

TOKEN = "api-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CALLBACK_TOKEN = "cb-secret"


# ------------------------------------------------------------------ a small file server


@dataclass
class FileServer:
    """Answers ``GET /<name>`` from ``routes``: (status, headers, body, delay before body).

    It writes what it is told, lies about lengths when told to, and records each request.
    """

    routes: dict[str, list[tuple[int, dict[str, str], bytes, float]]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)
    port: int = 0

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{name}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode().lstrip("/")
            self.seen.append(path)
            answers = self.routes.get(path) or [(404, {}, b"gone", 0.0)]
            status, headers, body, delay = answers.pop(0) if len(answers) > 1 else answers[0]
            lines = [f"HTTP/1.1 {status} X", "Connection: close"]
            if "Content-Length" not in headers:
                lines.append(f"Content-Length: {len(body)}")
            lines += [f"{k}: {v}" for k, v in headers.items() if v]
            try:
                await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
                if delay:
                    await trio.sleep(delay)
                await stream.send_all(body)
            except trio.BrokenResourceError:
                pass

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


@pytest.fixture
async def files(nursery: trio.Nursery) -> FileServer:
    server = FileServer()
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def simulator(nursery: trio.Nursery) -> str:
    config = SimulatorConfig(port=0, duration_s=(0.2, 0.2), seed=3)
    url: str = await nursery.start(serve_simulator, config)
    return url


async def _fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.get(url)


def _port(url: str) -> int:
    return httpx.URL(url).port or 80


async def _start(
    start_daemon: DaemonStarter,
    settings: Settings,
    tmp_path: Path,
    *,
    allow: tuple[str, ...] = (),
    public: bool = True,
    **changes: object,
) -> RunningDaemon:
    port = free_port()
    return await start_daemon(
        settings,
        port=port,
        public_url=f"http://127.0.0.1:{port}" if public else None,
        callback_token=CALLBACK_TOKEN,
        api_token=TOKEN,
        archive=DirArchiveSettings(path=tmp_path / "archive"),
        archive_allow_hosts=frozenset(allow),
        **changes,
    )


async def _archived(http: httpx.AsyncClient, job_id: str, state: str = "archived") -> dict:
    async def done() -> dict | None:
        job = (await http.get(f"/v1/jobs/{job_id}", headers=AUTH)).json()
        return job if (job.get("archive") or {}).get("state") == state else None

    found: dict = await wait_for(done, within_s=10)
    return found


async def _track(http: httpx.AsyncClient, task_id: str) -> str:
    r = await http.post("/v1/jobs", json={"task_id": task_id, "family": "market"}, headers=AUTH)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _callback(http: httpx.AsyncClient, task_id: str, urls: list[str]) -> None:
    data = {"taskId": task_id, "state": "success", "resultJson": json.dumps({"resultUrls": urls})}
    body = {"code": 200, "msg": "Playground task completed successfully.", "data": data}
    r = await http.post(f"/callbacks/kie?token={CALLBACK_TOKEN}", json=body)
    assert r.status_code == 200


async def _metric(http: httpx.AsyncClient, line_start: str) -> float:
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {line_start} in /metrics")


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("by", ["callback", "poll"])
async def test_a_succeeded_jobs_files_are_archived_and_served(
    settings, start_daemon, simulator, tmp_path, by
):
    daemon = await _start(
        start_daemon,
        settings,
        tmp_path,
        allow=(f"127.0.0.1:{_port(simulator)}",),
        public=by == "callback",  # without a public URL kied gives KIE no callback and polls
        kie_base_url=simulator,
    )
    async with daemon.client() as http:
        r = await http.post(
            "/v1/jobs", json={"model": "google/nano-banana", "input": {"prompt": "x"}}, headers=AUTH
        )
        job_id = r.json()["id"]
        job = await _archived(http, job_id)
        assert job["state"] == "succeeded"
        assert job["ended_by"] == by
        [kie_url] = job["result_urls"]
        served = await _fetch(kie_url)
        [kept] = job["files"]
        base = daemon.url if by == "callback" else ""
        assert kept["url"] == f"{base}/v1/jobs/{job_id}/files/0"
        assert kept["kie_url"] == kie_url
        assert kept["sha256"] == hashlib.sha256(served.content).hexdigest()
        assert kept["size"] == len(served.content)
        assert kept["content_type"] == served.headers["content-type"]
        assert job["last_error"] is None

        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers=AUTH)
        assert r.status_code == 200
        assert r.content == served.content
        assert r.headers["content-type"] == served.headers["content-type"]
        assert r.headers["x-content-type-options"] == "nosniff"
        etag = r.headers["etag"]
        assert etag == f'"{kept["sha256"]}"'
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers={**AUTH, "If-None-Match": etag})
        assert (r.status_code, r.content) == (304, b"")
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers={**AUTH, "Range": "bytes=2-5"})
        assert r.status_code == 206
        assert r.content == served.content[2:6]
        assert r.headers["content-range"] == f"bytes 2-5/{len(served.content)}"
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers={**AUTH, "Range": "bytes=-4"})
        assert (r.status_code, r.content) == (206, served.content[-4:])
        r = await http.get(
            f"/v1/jobs/{job_id}/files/0",
            headers={**AUTH, "Range": f"bytes={len(served.content)}-"},
        )
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{len(served.content)}"

        assert (await http.get(f"/v1/jobs/{job_id}/files/0")).status_code == 401
        assert (await http.get(f"/v1/jobs/{job_id}/files/1", headers=AUTH)).status_code == 404
        assert (await http.get("/v1/jobs/no-such-job/files/0", headers=AUTH)).status_code == 404
        assert await _metric(http, 'kied_archived_files_total{backend="dir"}') == 1
        assert await _metric(http, 'kied_archived_bytes_total{backend="dir"}') == len(
            served.content
        )
        events = (await http.get("/v1/events", headers=AUTH)).json()["events"]
        types = [e["type"] for e in events if e["job"]["id"] == job_id]
        assert types[-2:] == ["job.succeeded", "job.archived"]
        assert events[-1]["job"]["files"] == [kept]
    await daemon.shutdown()


async def test_refused_addresses_leave_the_job_succeeded(settings, start_daemon, tmp_path, files):
    files.routes["secret"] = [(200, {"Content-Type": "text/plain"}, b"internal", 0.0)]
    daemon = await _start(start_daemon, settings, tmp_path)
    async with daemon.client() as http:
        loopback = await _track(http, "t-loopback")
        await _callback(http, "t-loopback", [files.url("secret")])
        job = await _archived(http, loopback, "failed")
        assert job["state"] == "succeeded"
        assert job["files"] == []
        assert job["last_error"].startswith("archive refused: 127.0.0.1 resolves to 127.0.0.1")
        metadata = await _track(http, "t-metadata")
        await _callback(http, "t-metadata", ["http://169.254.169.254/latest/meta-data/"])
        job = await _archived(http, metadata, "failed")
        assert "metadata" in job["last_error"]
        mapped = await _track(http, "t-mapped")
        await _callback(http, "t-mapped", [f"http://[::ffff:127.0.0.1]:{files.port}/secret"])
        assert "loopback" in (await _archived(http, mapped, "failed"))["last_error"]
        r = await http.get(f"/v1/jobs/{loopback}/files/0", headers=AUTH)
        assert r.status_code == 409
        assert r.json()["archive"] == "failed"
        assert await _metric(http, 'kied_archive_refusals_total{kind="loopback"}') == 2
        assert await _metric(http, 'kied_archive_refusals_total{kind="metadata"}') == 1
        assert await _metric(http, 'kied_archive_failures_total{reason="gave_up"}') == 3
    assert files.seen == []  # nothing reached the internal server
    await daemon.shutdown()


async def test_a_file_announced_over_the_cap_is_refused_before_its_body(
    settings, start_daemon, tmp_path, files
):
    huge = str(2 * 1000**3)
    files.routes["huge"] = [(200, {"Content-Length": huge, "Content-Type": "video/mp4"}, b"", 5.0)]
    daemon = await _start(start_daemon, settings, tmp_path, allow=("127.0.0.1",))
    async with daemon.client() as http:
        job_id = await _track(http, "t-huge")
        await _callback(http, "t-huge", [files.url("huge")])
        with trio.fail_after(3):  # long before the server would send any body
            job = await _archived(http, job_id, "failed")
        assert f"announces {huge} bytes, over {1024**3}" in job["last_error"]
        assert await _metric(http, 'kied_archive_refusals_total{kind="too_large"}') == 1
    assert files.seen == ["huge"]
    assert not list((tmp_path / "archive").rglob("*.mp4"))
    await daemon.shutdown()


async def test_a_file_without_a_length_is_counted_while_streaming(
    settings, start_daemon, tmp_path, files
):
    # No Content-Length: the body ends when the server closes the connection.
    files.routes["endless"] = [(200, {"Content-Length": ""}, b"y" * 5000, 0.0)]
    daemon = await _start(
        start_daemon, settings, tmp_path, allow=("127.0.0.1",), archive_max_bytes=1000
    )
    async with daemon.client() as http:
        job_id = await _track(http, "t-endless")
        await _callback(http, "t-endless", [files.url("endless")])
        job = await _archived(http, job_id, "failed")
        assert "sent more than 1000 bytes" in job["last_error"]
    assert not [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
    await daemon.shutdown()


async def test_a_file_that_expires_two_seconds_after_the_callback_is_kept(
    settings, start_daemon, tmp_path, files
):
    body = bytes(range(256)) * 40
    files.routes["short-lived.png"] = [(200, {"Content-Type": "image/png"}, body, 0.0)]
    daemon = await _start(start_daemon, settings, tmp_path, allow=("127.0.0.1",))
    async with daemon.client() as http:
        job_id = await _track(http, "t-ttl")
        t0 = trio.current_time()
        await _callback(http, "t-ttl", [files.url("short-lived.png")])
        with trio.fail_after(2):
            job = await _archived(http, job_id)
        files.routes["short-lived.png"] = [(404, {}, b"expired", 0.0)]
        assert trio.current_time() - t0 < 2
        assert job["files"][0]["sha256"] == hashlib.sha256(body).hexdigest()
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers=AUTH)
        assert r.content == body
        assert (await _fetch(files.url("short-lived.png"))).status_code == 404
    await daemon.shutdown()


async def _event_types(http: httpx.AsyncClient, job_id: str) -> list[str]:
    events = (await http.get("/v1/events", headers=AUTH)).json()["events"]
    return [e["type"] for e in events if e["job"]["id"] == job_id]


@pytest.mark.parametrize("after", [False, True])
async def test_notify_after_archive_tells_the_success_once_the_files_are_kept(
    settings, start_daemon, tmp_path, files, after
):
    body = b"slow file " * 100
    files.routes["slow.png"] = [(200, {"Content-Type": "image/png"}, body, 0.6)]
    daemon = await _start(
        start_daemon, settings, tmp_path, allow=("127.0.0.1",), notify_after_archive=after
    )
    async with daemon.client() as http:
        job_id = await _track(http, "t-notify")
        await _callback(http, "t-notify", [files.url("slow.png")])
        r = await http.get(f"/v1/jobs/{job_id}", headers=AUTH)
        assert r.json()["state"] == "succeeded"
        # the download takes 0.6 s
        told = await _event_types(http, job_id)
        assert told == (["job.created"] if after else ["job.created", "job.succeeded"])
        await _archived(http, job_id)
        assert await _event_types(http, job_id) == ["job.created", "job.succeeded", "job.archived"]
        events = (await http.get("/v1/events", headers=AUTH)).json()["events"]
        [succeeded] = [e for e in events if e["type"] == "job.succeeded"]
        assert len(succeeded["job"]["files"]) == (1 if after else 0)
    await daemon.shutdown()


async def test_notify_after_archive_tells_the_success_when_kied_gives_up(
    settings, start_daemon, tmp_path
):
    daemon = await _start(start_daemon, settings, tmp_path, notify_after_archive=True)
    async with daemon.client() as http:
        job_id = await _track(http, "t-refused")
        await _callback(http, "t-refused", ["http://169.254.169.254/latest/meta-data/"])
        await _archived(http, job_id, "failed")
        assert await _event_types(http, job_id) == ["job.created", "job.succeeded"]
        events = (await http.get("/v1/events", headers=AUTH)).json()["events"]
        assert "metadata" in events[-1]["job"]["last_error"]
    await daemon.shutdown()


async def test_retention_deletes_the_files_with_the_job(settings, start_daemon, tmp_path, files):
    files.routes["kept.png"] = [(200, {"Content-Type": "image/png"}, b"kept", 0.0)]
    daemon = await _start(start_daemon, settings, tmp_path, allow=("127.0.0.1",))
    async with daemon.client() as http:
        job_id = await _track(http, "t-kept")
        await _callback(http, "t-kept", [files.url("kept.png")])
        await _archived(http, job_id)
    await daemon.shutdown()
    kept = tmp_path / "archive" / job_id / "0.png"
    assert kept.read_bytes() == b"kept"
    await trio.sleep(0.05)
    # A leader that keeps ended jobs 10 ms prunes this one at once, and its files with it.
    daemon = await _start(start_daemon, settings, tmp_path, job_retention_s=0.01)
    async with daemon.client() as http:

        async def gone() -> bool:
            return not kept.parent.exists()

        await wait_for(gone, within_s=5)
        assert (await http.get(f"/v1/jobs/{job_id}", headers=AUTH)).status_code == 404
    await daemon.shutdown()


async def test_kied_archive_retry_failed(settings, start_daemon, tmp_path, files):
    files.routes["late.png"] = [(404, {}, b"not yet", 0.0)]
    files.routes["lost.png"] = [(200, {"Content-Type": "image/png"}, b"lost", 0.0)]
    daemon = await _start(
        start_daemon, settings, tmp_path, allow=("127.0.0.1",), archive_scan_s=0.2
    )
    async with daemon.client() as http:
        failed = await _track(http, "t-late")
        await _callback(http, "t-late", [files.url("late.png")])
        await _archived(http, failed, "failed")
        lost = await _track(http, "t-lost")
        await _callback(http, "t-lost", [files.url("lost.png")])
        await _archived(http, lost)
        (tmp_path / "archive" / lost / "0.png").unlink()
        assert (await http.get(f"/v1/jobs/{lost}/files/0", headers=AUTH)).status_code == 404
        files.routes["late.png"] = [(200, {"Content-Type": "image/png"}, b"late", 0.0)]

        result = await trio.run_process(
            [
                PYTHON,
                "-m",
                "kied",
                "archive",
                "--retry-failed",
                "--database",
                str(settings.store.path),
                "--archive",
                f"dir:{tmp_path / 'archive'}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            env=_plain_environment(),
        )
        out = result.stdout.decode()
        assert f"failed: 1 job(s) marked to archive again\n  {failed}\n" in out
        assert f"files missing: 1 job(s) marked to archive again\n  {lost}\n" in out
        # the running leader finds them at its next scan
        for job_id, content in ((failed, b"late"), (lost, b"lost")):
            await _archived(http, job_id)
            r = await http.get(f"/v1/jobs/{job_id}/files/0", headers=AUTH)
            assert r.content == content
    await daemon.shutdown()


def _plain_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KIED_", "KIE_"))}


async def test_on_postgresql_too(settings, start_daemon, tmp_path, files, pg_url):
    files.routes["pg.png"] = [(200, {"Content-Type": "image/png"}, b"on postgres", 0.0)]
    daemon = await _start(
        start_daemon,
        settings,
        tmp_path,
        allow=("127.0.0.1",),
        store=PostgresStoreSettings(url=pg_url),
        notify_after_archive=True,
    )
    async with daemon.client() as http:
        job_id = await _track(http, "t-pg")
        await _callback(http, "t-pg", [files.url("pg.png")])
        job = await _archived(http, job_id)
        assert job["files"][0]["size"] == len(b"on postgres")
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers=AUTH)
        assert r.content == b"on postgres"
        assert await _event_types(http, job_id) == ["job.created", "job.succeeded", "job.archived"]
    await daemon.shutdown()


async def test_files_kept_in_s3_are_served_by_a_presigned_redirect(
    settings, start_daemon, simulator, tmp_path, s3_server
):
    port = free_port()
    daemon = await start_daemon(
        settings,
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        callback_token=CALLBACK_TOKEN,
        api_token=TOKEN,
        kie_base_url=simulator,
        archive=S3ArchiveSettings(
            bucket=s3_server.bucket,
            prefix="kied/files",
            endpoint_url=s3_server.endpoint_url,
            region=s3_server.region,
            access_key_id=s3_server.access_key_id,
            secret_access_key=s3_server.secret_access_key,
            presign_expires_s=60,
        ),
        archive_allow_hosts=frozenset({f"127.0.0.1:{_port(simulator)}"}),
    )
    async with daemon.client() as http:
        r = await http.post(
            "/v1/jobs", json={"model": "google/nano-banana", "input": {"prompt": "x"}}, headers=AUTH
        )
        job_id = r.json()["id"]
        job = await _archived(http, job_id)
        [kept] = job["files"]
        served = await _fetch(job["result_urls"][0])
        assert kept["sha256"] == hashlib.sha256(served.content).hexdigest()
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers=AUTH)
        assert r.status_code == 307
        presigned = r.headers["location"]
        assert presigned.startswith(f"{s3_server.endpoint_url}/{s3_server.bucket}/kied/files/")
        assert s3_server.secret_access_key not in presigned
        r = await _fetch(presigned)
        assert r.status_code == 200
        assert r.content == served.content
        assert r.headers["content-type"] == kept["content_type"]
        assert await _metric(http, 'kied_archived_files_total{backend="s3"}') == 1
    await daemon.shutdown()


def test_a_bad_or_unavailable_archive_stops_kied_serve_with_one_line(tmp_path: Path):
    for value, named in (("bogus", "--archive"), ("s3://", "--archive")):
        proc = kied(
            "serve", "--port", "0", "--database", str(tmp_path / "kied.db"), "--archive", value
        )
        assert proc.wait(timeout=30) == 2
        last = proc.stderr.read().strip().splitlines()[-1]  # type: ignore[union-attr]
        stop(proc)
        assert last.startswith(f"kied: {named}: ")


# ------------------------------------------------------------------ retries, in virtual time


@dataclass
class _Harness:
    store: MemoryStore
    archiver: Archiver
    metrics: Metrics


def _harness(settings: Settings, tmp_path: Path, transport: httpx.MockTransport) -> _Harness:
    store = MemoryStore()
    metrics = Metrics()

    def now() -> float:
        return 1_000_000.0 + trio.current_time()

    changes = JobChanges(metrics=metrics, health=CallbackHealth(), now=now)
    archiver = Archiver(
        store=store,
        backend=DirArchive(tmp_path / "archive"),
        settings=replace(settings, archive=DirArchiveSettings(path=tmp_path / "archive")),
        changes=changes,
        metrics=metrics,
        now=now,
        transport=transport,
    )
    changes.listeners.append(archiver)
    return _Harness(store=store, archiver=archiver, metrics=metrics)


async def _succeed(harness: _Harness, url: str) -> JobId:
    await harness.store.set_archive_mode("on")
    job, _ = await harness.store.create_job(make_new_job(task_id="t-retry"))
    report = Report(event=EventKind.SUCCEEDED, source=EndedBy.POLL, result_urls=(url,))
    done = await harness.store.apply(job.id, report, now=1_000_000.0 + trio.current_time())
    assert done is not None
    return job.id


async def test_network_and_5xx_failures_are_retried_with_back_off(
    settings, tmp_path, nursery, autojump_clock
):
    # The download's file writes run in threads: the clock may only jump once they are done.
    autojump_clock.autojump_threshold = 0.05
    answers: list[int | None] = [None, 503, 502, 200]
    asked_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked_at.append(trio.current_time())
        status = answers.pop(0)
        if status is None:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(status, content=b"PNG" * 100, headers={"Content-Type": "image/png"})

    harness = _harness(settings, tmp_path, httpx.MockTransport(handler))
    t0 = trio.current_time()
    job_id = await _succeed(harness, "https://cdn.example/0.png")
    await nursery.start(harness.archiver.run)

    async def archived() -> Job | None:
        job = await harness.store.get_job(job_id)
        return job if job is not None and job.archive_state is ArchiveState.ARCHIVED else None

    with trio.fail_after(60):
        while True:
            if await archived() is not None:
                break
            await trio.sleep(0.25)
    # tried at once, then after 1, 2 and 5 s (RETRY_SCHEDULE_S)
    assert [t - t0 for t in asked_at] == [0, 1, 3, 8]
    job = await archived()
    assert job is not None
    assert job.state is JobState.SUCCEEDED
    assert job.last_error is None
    assert job.files[0].sha256 == hashlib.sha256(b"PNG" * 100).hexdigest()
    assert (tmp_path / "archive" / job_id / "0.png").read_bytes() == b"PNG" * 100
    text = harness.metrics.exposition().decode()
    assert 'kied_archive_failures_total{reason="retry"} 3.0' in text


async def test_a_gone_file_is_given_up_at_once_and_the_last_error_kept(
    settings, tmp_path, nursery, autojump_clock
):
    autojump_clock.autojump_threshold = 0.05
    transport = httpx.MockTransport(lambda request: httpx.Response(404, content=b"expired"))
    harness = _harness(settings, tmp_path, transport)
    job_id = await _succeed(harness, "https://cdn.example/0.png")
    await nursery.start(harness.archiver.run)
    with trio.fail_after(10):
        while True:
            job = await harness.store.get_job(job_id)
            assert job is not None
            if job.archive_state is ArchiveState.FAILED:
                break
            await trio.sleep(0.25)
    assert job.last_error == "archive failed: cdn.example answered 404"
    assert job.state is JobState.SUCCEEDED


# ------------------------------------------------------------------ with the simulator's files


async def test_a_file_that_fails_once_and_expires_after_two_seconds_is_kept(
    settings, start_daemon, tmp_path, nursery
):
    config = SimulatorConfig(
        port=0, duration_s=(0.1, 0.1), seed=4, file_ttl_s=2.0, file_fail_first=1
    )
    sim_url: str = await nursery.start(serve_simulator, config)
    daemon = await _start(
        start_daemon,
        settings,
        tmp_path,
        allow=(f"127.0.0.1:{_port(sim_url)}",),
        kie_base_url=sim_url,
    )
    async with daemon.client() as http:
        r = await http.post(
            "/v1/jobs", json={"model": "google/nano-banana", "input": {"prompt": "x"}}, headers=AUTH
        )
        job_id = r.json()["id"]
        with trio.fail_after(2.5):
            job = await _archived(http, job_id)
        assert job["archive"]["attempts"] == 1  # the 503, then a retry 1 s later
        [kept] = job["files"]
        await trio.sleep(2.0)
        assert (await _fetch(job["result_urls"][0])).status_code == 404  # expired at KIE
        r = await http.get(f"/v1/jobs/{job_id}/files/0", headers=AUTH)
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == kept["sha256"]
        assert len(r.content) == kept["size"]
    await daemon.shutdown()


def test_a_leader_killed_mid_download_leaves_the_file_to_the_next(tmp_path: Path):
    sim = kied(
        "simulate",
        *("--port", "0", "--duration", "0.2", "--seed", "6"),
        *("--file-size", "600000", "--file-slow", "300000"),
        env={},
    )
    daemons: dict[str, subprocess.Popen[str]] = {}
    try:
        sim_url = read_url(sim, stream="stdout")
        env = {
            "KIED_DATABASE_URL": str(tmp_path / "kied.db"),
            "KIE_BASE_URL": sim_url,
            "KIE_API_KEY": "k",
            "KIED_ARCHIVE_ALLOW_HOSTS": f"127.0.0.1:{_port(sim_url)}",
        }
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            daemons[url] = kied("serve", "--port", str(port), env=env)
            wait_until(lambda url=url: mode(url) is not None)
        leader = str(wait_until(lambda: next((u for u in daemons if mode(u) == "ACTIVE"), None)))
        r = httpx.post(
            f"{leader}/v1/jobs", json={"model": "m", "input": {"prompt": "p"}}, timeout=5
        )
        job_id = r.json()["id"]

        def downloading() -> bool:
            stats = httpx.get(f"{sim_url}/_sim/stats", timeout=5).json()
            return bool(stats["totals"]["file_requests"])

        wait_until(downloading, within_s=10)
        daemons[leader].kill()  # kill -9 while the 2 s download is on its way
        daemons[leader].wait(timeout=10)
        [other] = [u for u in daemons if u != leader]

        def archived() -> dict | None:
            job = httpx.get(f"{other}/v1/jobs/{job_id}", timeout=5).json()
            return job if (job.get("archive") or {}).get("state") == "archived" else None

        job = wait_until(archived, within_s=15)
        assert isinstance(job, dict)
        assert mode(other) == "ACTIVE"
        stats = httpx.get(f"{sim_url}/_sim/stats", timeout=5).json()["totals"]
        assert stats["file_requests"] == 2
        content = httpx.get(f"{other}/v1/jobs/{job_id}/files/0", timeout=5).content
        assert len(content) == job["files"][0]["size"] == 600000
        assert hashlib.sha256(content).hexdigest() == job["files"][0]["sha256"]
        # the archive holds the one file: no partial download was left in its place
        kept = [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
        assert [p.relative_to(tmp_path / "archive").parts[0] for p in kept] == [job_id]
    finally:
        for proc in [*daemons.values(), sim]:
            stop(proc)
