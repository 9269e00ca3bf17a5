"""What the inbox keeps of untrusted input, the bound on /v1 bodies, and the journal that
keeps callbacks while storage is down.

Most tests drive the real daemon over HTTP; those that need a store that fails, or the
autojump clock, run the daemon's app in process (as tests/integration/test_metrics.py
does).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from kied.core.jobs import EndedBy, EventKind, JobState, Report
from kied.daemon import Daemon
from kied.errors import StoreUnavailableError
from kied.intake import REJECTED_BODY_KEPT
from kied.journal import CallbackJournal, open_journal
from kied.settings import NoLockSettings, PostgresStoreSettings, SqliteStoreSettings
from kied.store import open_store
from kied.testing import MemoryStore, make_inbox_entry, make_new_job
from kied.web import create_app
from tests.conftest import wait_for
from tests.integration.test_daemon import add_job, market_callback
from tests.integration.test_metrics import scrape
from tests.integration.test_pollers import settings as stack_settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from kied.settings import Settings
    from kied.store import InboxEntry, JobStore

TOKEN = "s3cret"


async def test_a_rejected_callback_keeps_its_size_hash_head_and_headers_without_secrets(
    settings, start_daemon
):
    daemon = await start_daemon(settings, callback_token=TOKEN)
    body = b'{"data":{"taskId":"t-1","state":"success"},"pad":"' + b"x" * 20_000 + b'"}'
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer hunter2",
        "Cookie": "session=hunter2",
        "X-KIE-Callback-Token": "wrong-hunter2",
        "X-Api-Key": "hunter2",
        "X-Webhook-Signature": "hunter2",
        "X-Request-Id": "req-1",
    }
    async with daemon.client() as http:
        r = await http.post("/callbacks/kie?token=hunter2", content=body, headers=headers)
        assert r.status_code == 200
        assert r.json()["stored"] is True
        good = market_callback("t-2")
        r = await http.post("/callbacks/kie", content=good, headers={"X-KIE-Callback-Token": TOKEN})
        assert r.json()["stored"] is True
    await daemon.shutdown()
    async with open_store(settings.store) as store:
        authentic, rejected = await store.list_callbacks()
    entry = rejected.entry
    assert not entry.authenticated
    assert entry.body == body[:REJECTED_BODY_KEPT]
    assert entry.body_size == len(body)
    assert entry.body_sha256 == hashlib.sha256(body).hexdigest()
    assert entry.headers is not None
    assert entry.headers["x-request-id"] == "req-1"
    assert entry.headers["content-type"] == "application/json"
    for secret in ("authorization", "cookie", "x-kie-callback-token", "x-api-key"):
        assert entry.headers[secret] == "***"
    assert entry.headers["x-webhook-signature"] == "***"
    assert "hunter2" not in json.dumps(entry.headers) + entry.query
    # An authentic callback keeps its whole body, its hash and its headers too.
    assert authentic.entry.authenticated
    assert authentic.entry.body == good
    assert authentic.entry.body_sha256 == hashlib.sha256(good).hexdigest()
    assert authentic.entry.headers is not None
    assert authentic.entry.headers["x-kie-callback-token"] == "***"


@asynccontextmanager
async def in_process(
    config: Settings, store: JobStore, journal: CallbackJournal | None = None
) -> AsyncIterator[tuple[Daemon, httpx.AsyncClient]]:
    daemon = Daemon(config, store=store, journal=journal)
    app = create_app(callbacks=daemon.callbacks, jobs=daemon.jobs, status=daemon, settings=config)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(transport=transport, base_url="http://kied.test") as http,
    ):
        nursery.start_soon(daemon.run_journal)
        yield daemon, http
        nursery.cancel_scope.cancel()


async def test_unauthenticated_callbacks_beyond_the_budget_are_answered_counted_and_dropped(
    tmp_path, autojump_clock
):
    config = stack_settings(tmp_path, callback_token=TOKEN, rejected_per_minute=3)
    store = MemoryStore()
    async with in_process(config, store) as (_, http):
        for _ in range(5):
            r = await http.post("/callbacks/kie", content=b"{}")
            assert r.status_code == 200
        assert len(await store.list_callbacks()) == 3
        assert r.json() == {"status": "received", "stored": False, "dropped": "rejected_budget"}
        # Authentic callbacks are outside the budget.
        r = await http.post(
            "/callbacks/kie",
            content=market_callback("t-1"),
            headers={"X-KIE-Callback-Token": TOKEN},
        )
        assert r.json()["stored"] is True
        m = await scrape(http)
        assert m.value("kied_callbacks_dropped_total", reason="rejected_budget") == 2
        assert m.value("kied_callback_responses_total", code="200") == 6
        # The budget fills again with time: a minute gives it back whole.
        await trio.sleep(60)
        for _ in range(3):
            r = await http.post("/callbacks/kie", content=b"{}")
            assert r.json()["stored"] is True
    assert len(await store.list_callbacks()) == 3 + 1 + 3


# kied answers 413 and closes the connection before the client has sent its whole body, so
# httpx's own async generator over the body is left unfinished (on the client's side).
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object AsyncIteratorByteStream"
)
async def test_a_v1_body_beyond_the_bound_is_refused_with_413(settings, start_daemon):
    daemon = await start_daemon(settings, max_request_bytes=4096)
    big = json.dumps({"family": "market", "model": "m", "metadata": {"pad": "x" * 10_000}})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    async with daemon.client() as http:
        r = await http.post("/v1/jobs", content=big)
        assert r.status_code == 413
        assert r.json()["limit"] == 4096
        assert "4096 bytes" in r.json()["detail"]
        # A body without Content-Length is read no further than the bound.
        r = await http.post("/v1/jobs", content=chunks())
        assert r.status_code == 413
        assert r.json()["limit"] == 4096
        # A callback is bounded by its own setting, not this one.
        r = await http.post("/callbacks/kie", content=market_callback("t-1") + b" " * 8000)
        assert r.status_code == 200
        assert r.json()["stored"] is True
    await daemon.shutdown()


async def test_jobs_are_refused_with_503_at_once_when_storage_cannot_be_reached(
    settings, start_daemon
):
    # Nothing listens on the discard port: every connection is refused.
    unreachable = PostgresStoreSettings(
        url="postgresql://kied@127.0.0.1:9/kied", connect_timeout_s=1.0
    )
    daemon = await start_daemon(settings, store=unreachable, lock=NoLockSettings())
    async with daemon.client() as http:

        async def not_ready() -> bool:
            return (await http.get("/readyz")).json()["reason"] != "storage is opening"

        await wait_for(not_ready)
        started = trio.current_time()
        r = await http.post("/v1/jobs", json={"family": "market", "model": "m", "input": {}})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"] == "storage unavailable"
        assert trio.current_time() - started < 2.0
    await daemon.shutdown()


class FailingStore(MemoryStore):
    """A MemoryStore whose server can be taken down: every write and ping then fails."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("PostgreSQL: no connection: connection refused")

    async def ping(self) -> None:
        self._check()
        await super().ping()

    async def record_callback(self, entry: Any, report: Any) -> Any:
        self._check()
        return await super().record_callback(entry, report)

    async def create_job(self, new: Any) -> Any:
        self._check()
        return await super().create_job(new)


async def test_callbacks_during_an_outage_are_journaled_and_stored_once_when_it_ends(tmp_path):
    config = stack_settings(tmp_path, callback_token=TOKEN, public_url=None)
    store = FailingStore()
    now = time.time()
    jobs = [
        (await store.create_job(make_new_job(task_id=f"t-{i}", created_at=now)))[0]
        for i in range(3)
    ]
    journal = open_journal(tmp_path / "journal", max_bytes=1 << 20)
    good = {"X-KIE-Callback-Token": TOKEN}
    async with in_process(config, store, journal) as (_, http):
        store.down = True
        for i in range(3):
            for _ in range(2):  # KIE may send one twice: both are kept
                r = await http.post(
                    "/callbacks/kie", content=market_callback(f"t-{i}"), headers=good
                )
                assert r.status_code == 200
                assert r.json() == {"status": "received", "stored": True, "journal": True}
        r = await http.post("/callbacks/kie", content=b"{}")  # unauthenticated: journaled too
        assert r.json()["journal"] is True
        assert journal.path.stat().st_size > 0
        assert await store.list_callbacks() == []
        # Storage is known down: a new job is refused at once, to be sent again.
        r = await http.post("/v1/jobs", json={"family": "market", "model": "m", "input": {}})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        m = await scrape(http)
        assert m.value("kied_callbacks_journaled_total") == 7
        store.down = False

        async def replayed() -> bool:
            return not journal.waiting

        await wait_for(replayed)
        stored = await store.list_callbacks()
        assert len(stored) == 7
        assert len({c.entry.journal_id for c in stored}) == 7
        for job in jobs:
            after = await store.get_job(job.id)
            assert after is not None
            assert (after.state, after.ended_by) == (JobState.SUCCEEDED, EndedBy.CALLBACK)
        events = [e for e in await store.list_events() if e.type == "job.succeeded"]
        assert len(events) == 3
        assert not journal.path.exists()
        assert not journal.replaying_path.exists()
        m = await scrape(http)
        assert m.value("kied_journal_replayed_total") == 7
        # Storage answers again: callbacks are stored directly.
        r = await http.post("/callbacks/kie", content=market_callback("t-0"), headers=good)
        assert r.json()["stored"] is True
        assert "journal" not in r.json()
        r = await http.post("/v1/jobs", json={"family": "market", "model": "m", "input": {}})
        assert r.status_code in (200, 201)
    journal.close()


class LateStore(MemoryStore):
    """A MemoryStore that writes a callback at once but answers only 10 s later."""

    async def record_callback(self, entry: Any, report: Any) -> Any:
        record = await super().record_callback(entry, report)
        await trio.sleep(10)
        return record


async def test_a_callback_storage_is_slow_to_answer_is_journaled_and_stored_once(
    tmp_path, autojump_clock
):
    config = stack_settings(tmp_path, callback_token=TOKEN)
    store = LateStore()
    job, _ = await store.create_job(make_new_job(task_id="t-1", created_at=time.time()))
    journal = open_journal(tmp_path / "journal", max_bytes=1 << 20)
    async with in_process(config, store, journal) as (_, http):
        started = trio.current_time()
        r = await http.post(
            "/callbacks/kie",
            content=market_callback("t-1"),
            headers={"X-KIE-Callback-Token": TOKEN},
        )
        assert r.json() == {"status": "received", "stored": True, "journal": True}
        # (The clock jumps on while the journal's fsync runs in its thread.)
        assert 3.0 <= trio.current_time() - started < 5.0

        # The replay waits 10 s (virtual) for storage, between file operations run in
        # threads; while a thread runs the autojump clock races ahead, so the bound on
        # this wait is real time, not virtual time.
        give_up = time.monotonic() + 30
        while journal.waiting:
            assert time.monotonic() < give_up, "the journal was not replayed"
            await trio.sleep(1)
        assert len(await store.list_callbacks()) == 1
        after = await store.get_job(job.id)
        assert after is not None
        assert after.state is JobState.SUCCEEDED
    journal.close()


class CrashError(Exception):
    """The process dies here."""


def _journaled(i: int) -> tuple[InboxEntry, Report]:
    entry = replace(
        make_inbox_entry(task_id=f"t-{i}", received_at=2_000.0 + i), journal_id=f"jnl_{i}"
    )
    return entry, Report(event=EventKind.SUCCEEDED, source=EndedBy.CALLBACK)


async def test_a_replay_interrupted_midway_applies_nothing_twice(tmp_path: Path):
    path = tmp_path / "callbacks.journal"
    journal = CallbackJournal(path, max_bytes=1 << 20)
    store = MemoryStore()
    for i in range(4):
        await store.create_job(make_new_job(task_id=f"t-{i}"))
        await journal.append(*_journaled(i))
    written = 0

    async def record_then_crash(entry: InboxEntry, report: Report | None) -> None:
        nonlocal written
        await store.record_callback(entry, report)
        written += 1
        if written == 2:  # stored, but the process dies before the journal knows it
            raise CrashError

    with pytest.raises(CrashError):
        await journal.replay(record_then_crash)
    assert journal.replaying_path.exists()
    # The process starts again: what was being replayed is replayed first, all of it.
    again = CallbackJournal(path, max_bytes=1 << 20)
    assert again.waiting
    await again.append(*_journaled(4))
    await store.create_job(make_new_job(task_id="t-4"))
    assert await again.replay(store.record_callback) == 5
    stored = await store.list_callbacks()
    assert sorted(c.entry.journal_id or "" for c in stored) == [f"jnl_{i}" for i in range(5)]
    succeeded = [e for e in await store.list_events() if e.type == "job.succeeded"]
    assert len(succeeded) == 5
    assert not again.waiting
    assert not path.exists()
    assert not again.replaying_path.exists()


async def test_the_journal_is_bounded(tmp_path: Path):
    journal = CallbackJournal(tmp_path / "callbacks.journal", max_bytes=2_000)
    config = stack_settings(tmp_path, callback_token=TOKEN)
    store = FailingStore()
    store.down = True
    async with in_process(config, store, journal) as (_, http):
        answers = []
        for i in range(10):
            r = await http.post(
                "/callbacks/kie",
                content=market_callback(f"t-{i}"),
                headers={"X-KIE-Callback-Token": TOKEN},
            )
            assert r.status_code == 200
            answers.append(r.json())
        m = await scrape(http)
    kept = [a for a in answers if a.get("journal")]
    assert 0 < len(kept) < 10
    assert all(a["dropped"] == "journal_full" for a in answers if not a.get("journal"))
    assert journal.size <= 2_000
    assert m.value("kied_callbacks_dropped_total", reason="journal_full") == 10 - len(kept)


def test_journal_directory_defaults(tmp_path: Path):
    from kied.journal import journal_directory

    sqlite = stack_settings(tmp_path, store=SqliteStoreSettings(path=tmp_path / "db" / "k.db"))
    assert journal_directory(sqlite) == tmp_path / "db"
    assert journal_directory(replace(sqlite, journal_dir=tmp_path / "j")) == tmp_path / "j"


async def test_two_processes_in_one_directory_take_a_journal_each(tmp_path: Path):
    first = open_journal(tmp_path, max_bytes=1 << 20)
    second = open_journal(tmp_path, max_bytes=1 << 20)
    assert first.path != second.path
    first.close()
    third = open_journal(tmp_path, max_bytes=1 << 20)
    assert third.path == first.path  # a later process replays what a stopped one left
    second.close()
    third.close()


async def test_a_callback_for_a_tracked_job_on_sqlite_is_unchanged(settings, start_daemon):
    # The usual path still stores at once, with a journal beside the database.
    await add_job(settings, "job-1", "t-1")
    daemon = await start_daemon(settings, callback_token=TOKEN)
    async with daemon.client() as http:
        r = await http.post(
            "/callbacks/kie",
            content=market_callback("t-1"),
            headers={"X-KIE-Callback-Token": TOKEN},
        )
        assert r.json()["stored"] is True
        assert isinstance(r.json()["id"], int)
        r = await http.get("/v1/jobs/job-1")
        assert r.json()["state"] == "succeeded"
    await daemon.shutdown()
