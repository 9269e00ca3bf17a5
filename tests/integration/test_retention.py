"""Retention: what the stores delete (all three), the leader's pruner, and ``kied prune``."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

import pytest
import trio

from kied.core.jobs import EndedBy, EventKind, JobId, JobState, Report, TaskId
from kied.core.views import iso
from kied.metrics import Metrics
from kied.pruner import BATCH, BATCH_PAUSE_S, ROUND_S, Retention, run_pruner
from kied.settings import SqliteStoreSettings
from kied.store import (
    CallbackEffect,
    DeliveryAttempt,
    DeliveryState,
    JobStore,
    NewDelivery,
    PruneKind,
    open_store,
)
from kied.testing import MemoryStore, make_inbox_entry, make_new_job
from tests.conftest import PYTHON, wait_for
from tests.integration.test_pollers import wall_clock
from tests.integration.test_store_contract import store

if TYPE_CHECKING:
    from pathlib import Path

    from kied.core.jobs import Job

__all__ = ["store"]  # the contract's fixture: every test that takes it runs on every store

DAY = 86400.0


async def _ended(store: JobStore, *, at: float, task_id: str | None = None) -> Job:
    """A job that ended (succeeded) at ``at``."""
    job, _ = await store.create_job(make_new_job(created_at=at - 10, task_id=task_id))
    ended = await store.apply(
        job.id, Report(event=EventKind.SUCCEEDED, source=EndedBy.POLL), now=at
    )
    assert ended is not None
    assert ended.ended_at == at
    return ended


async def _deliver(store: JobStore, job_id: JobId, *, at: float, state: DeliveryState) -> int:
    """A delivery made at ``at`` for ``job_id``, with one attempt that left it in ``state``."""
    event_id = f"evt_{job_id}_{at}"
    new = NewDelivery(
        event_id=event_id,
        event_cursor=1,
        job_id=job_id,
        type="job.succeeded",
        endpoint="https://a.test/h",
        body="{}",
        created_at=at,
    )
    await store.enqueue_deliveries([new], cursor=1)
    [delivery] = await store.list_deliveries(event_id=event_id)
    attempt = DeliveryAttempt(
        delivery_id=delivery.id, attempted_at=at + 1, status_code=500, duration_s=0.1, error="x"
    )
    later = at + 60 if state is DeliveryState.PENDING else None
    await store.record_attempt(attempt, state=state, next_attempt_at=later)
    return delivery.id


async def _prune_all(store: JobStore, kind: PruneKind, *, before: float, limit: int) -> int:
    deleted = 0
    while True:
        if kind is PruneKind.JOBS:
            count = len(await store.prune_jobs(before=before, limit=limit))
        elif kind is PruneKind.DELIVERIES:
            count = await store.prune_deliveries(before=before, limit=limit)
        elif kind is PruneKind.INBOX:
            count = await store.prune_inbox(before=before, limit=limit)
        else:
            count = await store.prune_events(before=before, limit=limit)
        deleted += count
        if count < limit:
            return deleted


# ------------------------------------------------------------------- the stores


async def test_old_ended_jobs_go_oldest_first_and_unfinished_ones_stay(store: JobStore) -> None:
    old = [await _ended(store, at=1_000.0 + i) for i in (3, 0, 2, 1)]
    young = await _ended(store, at=5_000.0)
    waiting, _ = await store.create_job(make_new_job(created_at=10.0))  # submitting, never ended
    pending, _ = await store.create_job(make_new_job(created_at=10.0, task_id="t-pending"))
    by_end = [j.id for j in sorted(old, key=lambda j: j.ended_at or 0.0)]

    # the three that ended first go first (the ids come in no particular order)
    assert set(await store.prune_jobs(before=2_000.0, limit=3)) == set(by_end[:3])
    assert await store.prune_jobs(before=2_000.0, limit=3) == by_end[3:]
    assert await store.prune_jobs(before=2_000.0, limit=3) == []
    for job in old:
        assert await store.get_job(job.id) is None
    kept = {j.id: j.state for j in await store.list_jobs()}
    assert kept == {
        young.id: JobState.SUCCEEDED,
        waiting.id: JobState.SUBMITTING,
        pending.id: JobState.PENDING,
    }
    # an unfinished job is never deleted, however old
    assert await store.prune_jobs(before=1e12, limit=100) == [young.id]
    assert {j.id for j in await store.list_jobs()} == {waiting.id, pending.id}


async def test_a_deleted_jobs_deliveries_and_callbacks(store: JobStore) -> None:
    job = await _ended(store, at=1_000.0, task_id="t-old")
    young = await _ended(store, at=5_000.0)
    record = await store.record_callback(
        make_inbox_entry(task_id="t-old", received_at=1_001.0),
        Report(event=EventKind.SUCCEEDED, source=EndedBy.CALLBACK),
    )
    assert record.effect is CallbackEffect.NO_OP
    delivered = await _deliver(store, job.id, at=1_000.0, state=DeliveryState.DELIVERED)
    failed = await _deliver(store, job.id, at=1_002.0, state=DeliveryState.FAILED)
    retrying = await _deliver(store, job.id, at=1_003.0, state=DeliveryState.PENDING)
    fresh = await _deliver(store, young.id, at=5_000.0, state=DeliveryState.DELIVERED)

    assert await store.prune_jobs(before=2_000.0, limit=10) == [job.id]
    assert await store.prune_deliveries(before=2_000.0, limit=10) == 2
    left = {d.id: d.state for d in await store.list_deliveries()}
    # a delivery still being tried is kept until it ends
    assert left == {retrying: DeliveryState.PENDING, fresh: DeliveryState.DELIVERED}
    assert await store.list_attempts(delivered) == []
    assert await store.list_attempts(failed) == []
    assert len(await store.list_attempts(retrying)) == 1
    # the callback stays, until its own retention, matched to no job
    [callback] = await store.list_callbacks()
    assert (callback.id, callback.matched_job_id) == (record.inbox_id, None)
    # the task id is free again
    assert await store.get_job_by_task(TaskId("t-old")) is None


async def test_the_inbox_is_pruned_by_age_in_batches(store: JobStore) -> None:
    success = Report(event=EventKind.SUCCEEDED, source=EndedBy.CALLBACK)
    for i in (4, 0, 3, 1, 2):
        # none names a known job: each waits for its job, and goes all the same
        await store.record_callback(
            make_inbox_entry(task_id=f"t-{i}", received_at=1_000.0 + i), success
        )
    await store.record_callback(make_inbox_entry(task_id="t-new", received_at=5_000.0), success)
    assert {c.effect for c in await store.list_callbacks()} == {CallbackEffect.NO_JOB}

    assert await store.prune_inbox(before=2_000.0, limit=2) == 2
    left = sorted(c.entry.received_at for c in await store.list_callbacks())
    assert left == [1_002.0, 1_003.0, 1_004.0, 5_000.0]  # the oldest went first
    assert await store.prune_inbox(before=2_000.0, limit=2) == 2
    assert await store.prune_inbox(before=2_000.0, limit=2) == 1
    assert await store.prune_inbox(before=2_000.0, limit=2) == 0
    [newest] = await store.list_callbacks()
    assert newest.entry.task_id == "t-new"
    # a job for a pruned callback's task is not ended by it
    job, _ = await store.create_job(make_new_job(task_id="t-0", created_at=6_000.0))
    assert job.state is JobState.PENDING
    # ids are never reused
    later = await store.record_callback(make_inbox_entry(received_at=6_001.0), None)
    assert later.inbox_id > newest.id


async def test_a_dry_run_counts_what_the_prune_then_deletes(store: JobStore) -> None:
    for i in range(7):
        job = await _ended(store, at=1_000.0 + 7 - i)
        await _deliver(store, job.id, at=1_000.0 + i, state=DeliveryState.DELIVERED)
        await store.record_callback(make_inbox_entry(received_at=1_100.0 - i), None)
    await _deliver(store, JobId("job-x"), at=1_000.0, state=DeliveryState.PENDING)
    await store.create_job(make_new_job(created_at=900.0))  # unfinished
    young = await _ended(store, at=5_000.0)
    await _deliver(store, young.id, at=5_000.0, state=DeliveryState.FAILED)
    await store.record_callback(make_inbox_entry(received_at=5_000.0), None)

    expected = {
        PruneKind.JOBS: (7, 1_001.0),
        PruneKind.DELIVERIES: (7, 1_000.0),
        PruneKind.INBOX: (7, 1_094.0),
        PruneKind.EVENTS: (15, 900.0),  # created and succeeded (7), created (unfinished)
    }
    for kind, (count, oldest) in expected.items():
        found = await store.count_prunable(kind, before=2_000.0)
        assert (found.count, found.oldest) == (count, oldest), kind
        assert await _prune_all(store, kind, before=2_000.0, limit=3) == count, kind
        after = await store.count_prunable(kind, before=2_000.0)
        assert (after.count, after.oldest) == (0, None), kind


# ------------------------------------------------------------------- the pruner


class _TimedStore(MemoryStore):
    """Notes the (virtual) time of every batch of jobs deleted."""

    def __init__(self) -> None:
        super().__init__()
        self.job_batches: list[tuple[float, int]] = []

    async def prune_jobs(self, *, before: float, limit: int) -> list[JobId]:
        deleted = await super().prune_jobs(before=before, limit=limit)
        self.job_batches.append((trio.current_time(), len(deleted)))
        return deleted


async def test_the_pruner_deletes_each_kind_in_paced_batches_every_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = _TimedStore()
    start = wall_clock()
    for i in range(BATCH * 2 + 10):
        await _ended(store, at=start - 31 * DAY + i)
    # ends 30 days before the clock's start plus half a round: kept by the first round,
    # pruned by the second
    crossing = await _ended(store, at=start - 30 * DAY + ROUND_S / 2)
    kept = await _ended(store, at=start - 29 * DAY)
    await store.record_callback(make_inbox_entry(received_at=start - 15 * DAY), None)
    await store.record_callback(make_inbox_entry(received_at=start - 13 * DAY), None)
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_pruner(
                store,
                retention=Retention(events_s=7 * DAY, jobs_s=30 * DAY, inbox_s=14 * DAY),
                now=wall_clock,
                metrics=metrics,
                task_status=task_status,
            )
        )
        await trio.sleep(1)
        t0 = store.job_batches[0][0]
        # three batches, a pause between each two, none longer than BATCH
        assert [n for _, n in store.job_batches] == [BATCH, BATCH, 10]
        assert [round(t - t0, 3) for t, _ in store.job_batches] == [
            0.0,
            BATCH_PAUSE_S,
            2 * BATCH_PAUSE_S,
        ]
        assert {j.id for j in await store.list_jobs(limit=10_000)} == {crossing.id, kept.id}
        assert [c.entry.received_at for c in await store.list_callbacks()] == [start - 13 * DAY]
        exposition = metrics.exposition().decode()
        assert f'kied_pruned_total{{kind="jobs"}} {BATCH * 2 + 10}.0' in exposition
        assert 'kied_pruned_total{kind="inbox"} 1.0' in exposition

        # the next round comes ROUND_S after the first, not before
        await trio.sleep_until(t0 + ROUND_S - 1)
        assert len(store.job_batches) == 3
        assert await store.get_job(crossing.id) is not None
        await trio.sleep_until(t0 + ROUND_S + 1)
        assert len(store.job_batches) == 4
        assert store.job_batches[3][0] == pytest.approx(t0 + ROUND_S, abs=0.5)
        assert {j.id for j in await store.list_jobs()} == {kept.id}
        assert f'kied_pruned_total{{kind="jobs"}} {BATCH * 2 + 11}.0' in (
            metrics.exposition().decode()
        )
        nursery.cancel_scope.cancel()


async def test_what_is_kept_forever_is_never_pruned(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    job = await _ended(store, at=wall_clock() - 400 * DAY)
    await store.record_callback(make_inbox_entry(received_at=wall_clock() - 400 * DAY), None)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_pruner(
                store,
                retention=Retention(jobs_s=None, inbox_s=None),
                now=wall_clock,
                task_status=task_status,
            )
        )
        await trio.sleep(ROUND_S + 1)
        assert await store.get_job(job.id) is not None
        assert len(await store.list_callbacks()) == 1
        assert await store.list_events() == []  # events still go
        nursery.cancel_scope.cancel()


async def test_the_leader_prunes_what_its_settings_no_longer_keep(settings, start_daemon) -> None:
    import time

    old_at = time.time() - 31 * DAY
    async with open_store(settings.store) as store:
        old = await _ended(store, at=old_at)
        await store.record_callback(make_inbox_entry(received_at=old_at), None)
        young = await _ended(store, at=time.time())
    daemon = await start_daemon(settings, inbox_retention_s=None)
    async with daemon.client() as http:

        async def pruned() -> bool:
            return 'kied_pruned_total{kind="jobs"} 1.0' in (await http.get("/metrics")).text

        await wait_for(pruned)
        assert (await http.get(f"/v1/jobs/{old.id}")).status_code == 404
        assert (await http.get(f"/v1/jobs/{young.id}")).status_code == 200
        assert 'kied_pruned_total{kind="inbox"} 0.0' in (await http.get("/metrics")).text
    await daemon.shutdown()
    async with open_store(settings.store) as store:
        assert len(await store.list_callbacks()) == 1  # kept forever


# ------------------------------------------------------------------- kied prune


def _kied_prune(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER"))
    }
    full_env.update(env)
    return subprocess.run(
        [PYTHON, "-m", "kied", "prune", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_kied_prune_counts_then_deletes_on_a_sqlite_file(tmp_path: Path) -> None:
    import time

    path = tmp_path / "kied.db"
    now = time.time()
    ended_at = now - 40 * DAY

    async def fill() -> None:
        async with open_store(SqliteStoreSettings(path=path)) as store:
            await _ended(store, at=ended_at)
            await _ended(store, at=now - DAY)
            await store.create_job(make_new_job(created_at=now - 100 * DAY))
            await store.record_callback(make_inbox_entry(received_at=now - 20 * DAY), None)
            await store.record_callback(make_inbox_entry(received_at=now - DAY), None)

    trio.run(fill)
    env = {"KIED_DATABASE_URL": f"sqlite:///{path}", "KIED_EVENT_RETENTION_DAYS": "3650"}

    dry = _kied_prune("--dry-run", env=env, cwd=tmp_path)
    assert (dry.returncode, dry.stderr) == (0, "")
    assert dry.stdout.splitlines() == [
        "kind        kept       would delete  oldest",
        f"jobs        30 days    1             {iso(ended_at)}",
        "deliveries  30 days    0             -",
        f"inbox       14 days    1             {iso(now - 20 * DAY)}",
        "events      3650 days  0             -",
        "signatures  10 min     0             -",
    ]
    pruned = _kied_prune(env={**env, "KIED_INBOX_RETENTION_DAYS": "never"}, cwd=tmp_path)
    assert (pruned.returncode, pruned.stderr) == (0, "")
    assert pruned.stdout.splitlines()[1:4] == [
        f"jobs        30 days    1        {iso(ended_at)}",
        "deliveries  30 days    0        -",
        "inbox       forever    -        -",
    ]
    again = _kied_prune("--dry-run", env=env, cwd=tmp_path)
    assert again.stdout.splitlines()[1] == "jobs        30 days    0             -"

    async def left() -> tuple[int, int]:
        async with open_store(SqliteStoreSettings(path=path)) as store:
            return len(await store.list_jobs()), len(await store.list_callbacks())

    assert trio.run(left) == (2, 2)


@pytest.mark.slow
def test_kied_prune_stops_on_a_bad_setting_with_one_line(tmp_path: Path) -> None:
    bad = _kied_prune("--dry-run", env={"KIED_JOB_RETENTION_DAYS": "-3"}, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "kied: KIED_JOB_RETENTION_DAYS: must be more than 0 and at most 3650 days, 0 or never,"
        " not '-3'"
    ]
    assert not (tmp_path / "var").exists()
