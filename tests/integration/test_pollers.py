"""Jobs end to end in one process under the autojump clock: kied's services, the poller
supervisor and KIE's client, against kied's own KIE simulator.

Nothing here touches a socket or a thread, so virtual time is exact: a 15-minute deadline
costs no real minutes. The simulator's callbacks are handed straight to kied's callback
service, as the HTTP layer would.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing

from kied.core.jobs import EndedBy, JobState
from kied.daemon import Daemon
from kied.kie.simulator import Simulator, SimulatorConfig, create_app
from kied.settings import NoLockSettings, Settings, SqliteStoreSettings
from kied.store import CallbackEffect
from kied.testing import MemoryStore, raw_callback

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

WALL0 = 1_767_225_600.0
API = "http://kie.test"
PUBLIC = "http://kied.test"


def wall_clock() -> float:
    return WALL0 + trio.current_time()


@dataclass
class Stack:
    daemon: Daemon
    store: MemoryStore
    sim: Simulator
    api: httpx.AsyncClient  # the simulator's API, for /_sim/stats
    leading: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None

    async def submit(self, **body: Any) -> dict[str, Any]:
        body.setdefault("model", "google/nano-banana")
        body.setdefault("input", {"prompt": "a red bicycle"})
        job, created = await self.daemon.jobs.submit(body)
        assert created
        return {"id": job.id, "created_at": job.created_at, "deadline_at": job.deadline_at}

    async def job(self, job_id: str):
        job = await self.store.get_job(job_id)  # type: ignore[arg-type]
        assert job is not None
        return job

    async def wait_terminal(self, job_id: str, within_s: float = 3600):
        with trio.fail_after(within_s):
            while True:
                job = await self.daemon.jobs.wait(job_id, 300)
                assert job is not None
                if job.terminal:
                    return job

    async def stats(self, task_id: str) -> dict[str, Any]:
        r = await self.api.get("/_sim/stats", params={"taskId": task_id})
        return r.json()["tasks"][task_id]

    def lead(self) -> None:
        """Become ACTIVE: the leader's work starts, as it does when the lock is won."""
        assert self.nursery is not None
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.daemon.run_pollers, self.store)
                    nursery.start_soon(self.daemon.run_webhooks, self.store)

        self.leading = scope
        self.nursery.start_soon(run)

    def step_down(self) -> None:
        assert self.leading is not None
        self.leading.cancel()
        self.leading = None


def settings(tmp_path: Path, **changes: Any) -> Settings:
    base = Settings(
        store=SqliteStoreSettings(path=tmp_path / "unused.db"),
        lock=NoLockSettings(),
        public_url=PUBLIC,
        kie_base_url=API,
        kie_api_key="test-key",
        job_timeout_s=900.0,
    )
    return replace(base, **changes)


def sim_config(**changes: Any) -> SimulatorConfig:
    return replace(SimulatorConfig(duration_s=(60.0, 60.0), seed=7), **changes)


@asynccontextmanager
async def open_stack(
    tmp_path: Path,
    config: SimulatorConfig,
    *,
    lead: bool = True,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    callbacks_on_the_way: Callable[[httpx.Request], Awaitable[list[httpx.Request]]] | None = None,
    **setting_changes: Any,
) -> AsyncIterator[Stack]:
    """``callbacks_on_the_way``: what happens to each callback between KIE and kied: the
    requests kied gets in its place (none, a changed one, or several)."""
    store = MemoryStore()
    holder: dict[str, Daemon] = {}

    async def deliver(request: httpx.Request) -> httpx.Response:
        arriving = (
            [request] if callbacks_on_the_way is None else await callbacks_on_the_way(request)
        )
        for arrived in arriving:
            await holder["daemon"].callbacks.handle(await raw_callback(arrived))
        return httpx.Response(200, json={"status": "received"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(deliver)) as hooks:
        sim = Simulator(config, client=hooks, now=wall_clock, base_url=API)
        sim_app = create_app(sim)
        transport = httpx.ASGITransport(app=sim_app)  # type: ignore[arg-type]
        daemon = Daemon(
            settings(tmp_path, **setting_changes),
            now=wall_clock,
            kie_transport=transport,
            store=store,
            webhook_transport=webhook_transport,
        )
        holder["daemon"] = daemon
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=sim_app), base_url=API) as api,  # type: ignore[arg-type]
            trio.open_nursery() as nursery,
        ):
            await nursery.start(sim.run)
            stack = Stack(daemon=daemon, store=store, sim=sim, api=api, nursery=nursery)
            if lead:
                stack.lead()
            yield stack
            nursery.cancel_scope.cancel()


async def test_a_callback_finishes_the_job_and_no_status_query_follows(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config()) as stack:
        t0 = trio.current_time()
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
        assert done.state is JobState.SUCCEEDED
        assert done.ended_by is EndedBy.CALLBACK
        assert done.ended_at == pytest.approx(WALL0 + t0 + 60)
        assert done.result_urls
        # One job in flight: the budget is spare, so it follows KIE's schedule meanwhile
        # (every 2-3 s for 30 s, then every 5-10 s), callbacks or not.
        queries = (await stack.stats(done.task_id))["status_queries"]
        assert 30 / 3 + 30 / 10 <= queries <= 30 / 2 + 30 / 5
        await trio.sleep(3600)
        assert (await stack.stats(done.task_id))["status_queries"] == queries
        assert stack.daemon._supervisor is not None
        assert stack.daemon._supervisor.polling == 0


async def test_a_dropped_callback_is_made_up_for_by_polling(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(drop_callbacks=1.0)) as stack:
        t0 = trio.current_time()
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
        assert done.state is JobState.SUCCEEDED
        assert done.ended_by is EndedBy.POLL
        # found by the first status query after the task finished: at most one poll interval late
        assert WALL0 + t0 + 60 <= done.ended_at <= WALL0 + t0 + 60 + 30
        assert done.result_urls
        assert (await stack.stats(done.task_id))["callbacks_sent"] == 0


async def test_failures_reported_by_callback_and_by_poll(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(fail_rate=1.0)) as stack:
        by_callback = await stack.wait_terminal((await stack.submit())["id"])
    assert by_callback.state is JobState.FAILED
    assert by_callback.error_code is not None
    async with open_stack(tmp_path, sim_config(fail_rate=1.0, drop_callbacks=1.0)) as stack:
        by_poll = await stack.wait_terminal((await stack.submit())["id"])
    assert by_poll.state is JobState.FAILED
    assert by_poll.ended_by is EndedBy.POLL
    assert by_poll.error_code is not None


async def test_a_stuck_task_times_out_exactly_at_its_deadline(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(stuck=1.0)) as stack:
        t0 = trio.current_time()
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
        assert done.state is JobState.TIMED_OUT
        assert done.ended_by is EndedBy.DEADLINE
        assert done.ended_at == WALL0 + t0 + 900
        assert trio.current_time() - t0 == 900
        assert stack.daemon._supervisor is not None
        assert stack.daemon._supervisor.polling == 0


async def test_a_custom_timeout_is_the_deadline(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(stuck=1.0)) as stack:
        t0 = trio.current_time()
        job = await stack.submit(timeout_s=2400)
        done = await stack.wait_terminal(job["id"])
        assert done.ended_at == WALL0 + t0 + 2400


async def test_a_late_outcome_replaces_timed_out(tmp_path, autojump_clock):
    config = sim_config(duration_s=(1000.0, 1000.0))
    async with open_stack(tmp_path, config) as stack:
        t0 = trio.current_time()
        job = await stack.submit()
        timed_out = await stack.wait_terminal(job["id"])
        assert timed_out.state is JobState.TIMED_OUT
        await trio.sleep_until(t0 + 1001)
        late = await stack.job(job["id"])
        assert late.state is JobState.SUCCEEDED
        assert late.late is True
        assert late.ended_by is EndedBy.CALLBACK
        assert late.ended_at == pytest.approx(WALL0 + t0 + 1000)


async def test_duplicate_callbacks_change_nothing_the_second_time(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(duplicate_callbacks=1.0)) as stack:
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
        await trio.sleep(60)
        rows = await stack.store.list_callbacks(task_id=done.task_id)
    assert done.state is JobState.SUCCEEDED
    assert sorted(r.effect for r in rows) == sorted([CallbackEffect.CHANGED, CallbackEffect.NO_OP])


async def test_malformed_callbacks_are_recorded_and_polling_finishes_the_job(
    tmp_path, autojump_clock
):
    async with open_stack(tmp_path, sim_config(malformed_callbacks=1.0)) as stack:
        jobs = [await stack.submit() for _ in range(6)]
        done = [await stack.wait_terminal(j["id"]) for j in jobs]
        rows = await stack.store.list_callbacks(limit=1000)
    # Some "malformed" bodies are still readable (a wrong content type, data as a JSON
    # string) and finish their job; the unreadable ones change nothing and polling ends it.
    assert all(d.state is JobState.SUCCEEDED for d in done)
    assert len(rows) >= len(jobs)
    unreadable = [r for r in rows if r.entry.task_id is None]
    assert unreadable
    assert all(r.effect is not CallbackEffect.CHANGED for r in unreadable)
    assert any(d.ended_by is EndedBy.POLL for d in done)


async def test_status_errors_are_retried_with_backoff(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(drop_callbacks=1.0, status_errors=0.6)) as stack:
        jobs = [await stack.submit() for _ in range(5)]
        done = [await stack.wait_terminal(j["id"]) for j in jobs]
    assert all(d.state is JobState.SUCCEEDED for d in done)
    assert all(d.ended_by is EndedBy.POLL for d in done)


async def test_kie_refusing_the_task_fails_the_job(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), kie_api_key=None) as stack:
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"], within_s=60)
    assert done.state is JobState.FAILED
    assert done.ended_by is EndedBy.SUBMIT
    assert done.error_code == "401"


async def test_an_idempotent_resubmission_returns_the_same_job(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config()) as stack:
        body = {
            "model": "google/nano-banana",
            "input": {"prompt": "x"},
            "idempotency_key": "order-17",
        }
        first, created = await stack.daemon.jobs.submit(body)
        again, created_again = await stack.daemon.jobs.submit(body)
        assert (created, created_again) == (True, False)
        assert again.id == first.id
        done = await stack.wait_terminal(first.id)
        assert done.state is JobState.SUCCEEDED
        assert len(await stack.store.list_jobs()) == 1


async def test_tracking_a_task_the_application_created(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(drop_callbacks=1.0)) as stack:
        r = await stack.api.post(
            "/api/v1/veo/generate",
            json={"prompt": "a fox"},
            headers={"Authorization": "Bearer test-key"},
        )
        task_id = r.json()["data"]["taskId"]
        job, created = await stack.daemon.jobs.submit({"task_id": task_id, "family": "veo"})
        assert created
        assert job.state is JobState.PENDING
        done = await stack.wait_terminal(job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.task_id == task_id
    assert done.result_urls


async def test_losing_leadership_stops_polling_and_the_next_leader_keeps_the_deadline(
    tmp_path, autojump_clock
):
    async with open_stack(tmp_path, sim_config(stuck=1.0)) as stack:
        t0 = trio.current_time()
        job = await stack.submit()
        await trio.sleep(100)
        task_id = (await stack.job(job["id"])).task_id
        stack.step_down()
        await trio.sleep(1)
        queries = (await stack.stats(task_id))["status_queries"]
        await trio.sleep(300)
        assert (await stack.stats(task_id))["status_queries"] == queries  # nobody polls
        stack.lead()
        done = await stack.wait_terminal(job["id"])
        assert done.state is JobState.TIMED_OUT
        assert done.ended_at == WALL0 + t0 + 900
        assert (await stack.stats(task_id))["status_queries"] > queries


async def test_passive_instances_record_callbacks_without_polling(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        job = await stack.submit()
        await trio.sleep(600)
        # nobody leads: the job waits, stored, for a leader to create its task
        assert (await stack.job(job["id"])).state is JobState.SUBMITTING
        stack.lead()
        done = await stack.wait_terminal(job["id"])
    assert done.state is JobState.SUCCEEDED


@pytest.mark.parametrize("n", [40])
async def test_many_jobs_with_a_fault_mix_all_end(tmp_path, autojump_clock, n):
    config = sim_config(
        duration_s=(30.0, 300.0),
        drop_callbacks=0.3,
        duplicate_callbacks=0.2,
        late_callbacks=0.1,
        malformed_callbacks=0.1,
        status_errors=0.1,
        fail_rate=0.2,
        stuck=0.05,
    )
    async with open_stack(tmp_path, config) as stack:
        jobs = [await stack.submit() for _ in range(n)]
        done = [await stack.wait_terminal(j["id"]) for j in jobs]
    states = {d.state for d in done}
    assert states <= {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT}
    assert math.isfinite(sum(d.ended_at for d in done))


class FlakyCreate(httpx.AsyncBaseTransport):
    """KIE's API, but the first ``failures`` createTask requests are answered 503."""

    def __init__(self, inner: httpx.AsyncBaseTransport, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.creates_at: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/createTask"):
            self.creates_at.append(trio.current_time())
            if len(self.creates_at) <= self.failures:
                return httpx.Response(503, text="busy")
        return await self.inner.handle_async_request(request)


async def test_a_busy_kie_is_asked_again_with_backoff(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        flaky = FlakyCreate(stack.daemon._kie_transport, failures=3)  # type: ignore[arg-type]
        stack.daemon._kie_transport = flaky
        stack.lead()
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
    assert done.state is JobState.SUCCEEDED
    assert len(flaky.creates_at) == 4
    gaps = [b - a for a, b in zip(flaky.creates_at, flaky.creates_at[1:], strict=False)]
    # exponential backoff: about 2, 4, 8 s (less up to a quarter for jitter)
    for gap, base in zip(gaps, (2, 4, 8), strict=True):
        assert base * 0.75 <= gap <= base
