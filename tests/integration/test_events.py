"""The event log end to end: what a job's life writes, and the leader's pruner."""

from __future__ import annotations

import trio

from kied.pruner import BATCH, ROUND_S, Retention, run_pruner
from kied.testing import MemoryStore, make_new_job
from tests.integration.test_pollers import open_stack, sim_config, wall_clock


async def test_a_jobs_life_is_told_in_order(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config()) as stack:
        ok = (await stack.submit())["id"]
        stuck = (await stack.submit(timeout_s=120, input={"prompt": "x"}))["id"]
        cancelled = (await stack.submit())["id"]
        await trio.sleep(1)
        await stack.daemon.jobs.cancel(cancelled)
        await stack.wait_terminal(ok)
        await stack.wait_terminal(stuck)
        events = await stack.store.list_events(limit=1000)
        by_job: dict[str, list[str]] = {}
        for event in events:
            by_job.setdefault(event.job_id, []).append(event.type)
        assert by_job[ok] == ["job.created", "job.submitted", "job.succeeded"]
        assert by_job[cancelled] == ["job.created", "job.submitted", "job.cancelled"]
        assert by_job[stuck][0] == "job.created"
        assert [e.cursor for e in events] == sorted(e.cursor for e in events)


async def test_the_pruner_deletes_old_events_in_batches(autojump_clock):
    store = MemoryStore()
    old = BATCH * 2 + 10
    for i in range(old):
        await store.create_job(make_new_job(created_at=wall_clock() - 8 * 86400 + i))
    fresh, _ = await store.create_job(make_new_job(created_at=wall_clock()))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_pruner(
                store,
                retention=Retention(events_s=7 * 86400),
                now=wall_clock,
                task_status=task_status,
            )
        )
        await trio.sleep(1)
        left = await store.list_events(limit=10_000)
        assert [e.job_id for e in left] == [fresh.id]
        await store.create_job(make_new_job(created_at=wall_clock() - 8 * 86400))
        await trio.sleep(ROUND_S)
        assert [e.job_id for e in await store.list_events(limit=10_000)] == [fresh.id]
        nursery.cancel_scope.cancel()
