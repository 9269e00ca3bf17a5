"""The status-query budget under the autojump clock: when jobs are queried, how often, and
what a new leader queries first after callbacks went unheard.

The stack of test_pollers.py (kied's services and KIE's simulator in one process), with
every status query's virtual time and task id kept.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

import kied.pollers
from kied.core.jobs import EndedBy, JobState, Report
from kied.core.jobs import EventKind as E
from kied.kie.client import STATUS_LIMIT
from kied.testing import make_new_job
from tests.integration.test_pollers import WALL0, Stack, open_stack, sim_config

if TYPE_CHECKING:
    from collections.abc import Iterable

BUDGET = 8.0
MODEL = "google/nano-banana"


class QueryLog(httpx.AsyncBaseTransport):
    """KIE's API, keeping each status query's virtual time and task id."""

    def __init__(self, stack: Stack) -> None:
        self.inner = stack.daemon._kie_transport
        self.queries: list[tuple[float, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        task_id = request.url.params.get("taskId")
        if request.method == "GET" and task_id is not None:
            self.queries.append((trio.current_time(), task_id))
        assert self.inner is not None
        return await self.inner.handle_async_request(request)

    def times(self, task_id: str) -> list[float]:
        return [at for at, task in self.queries if task == task_id]

    def between(self, start: float, end: float) -> list[tuple[float, str]]:
        return [(at, task) for at, task in self.queries if start <= at < end]

    def firsts(self, start: float, end: float) -> dict[str, float]:
        """Each task's first query in ``[start, end)``."""
        first_of: dict[str, float] = {}
        for at, task in self.between(start, end):
            first_of.setdefault(task, at)
        return first_of


def logged(stack: Stack, *, lead: bool = True) -> QueryLog:
    log = QueryLog(stack)
    stack.daemon._kie_transport = log
    if lead:
        stack.lead()
    return log


def max_rate(times: Iterable[float], window_s: float) -> float:
    """The most queries in any ``window_s`` (starting at a query), a second."""
    ordered = sorted(times)
    most = 0
    for i, start in enumerate(ordered):
        most = max(most, sum(1 for t in ordered[i:] if t < start + window_s))
    return most / window_s


async def submitted(stack: Stack, count: int, **body: Any) -> list[dict[str, Any]]:
    return [await stack.submit(**body) for _ in range(count)]


async def task_ids(stack: Stack, jobs: list[dict[str, Any]]) -> list[str]:
    """The jobs' task ids, once createTask has answered each."""
    while True:
        found = [(await stack.job(j["id"])).task_id for j in jobs]
        if all(found):
            return [str(task) for task in found]
        await trio.sleep(0.1)


async def test_few_jobs_with_dropped_callbacks_end_seconds_after_their_tasks(
    tmp_path, autojump_clock
):
    # A fresh daemon has no evidence about callbacks (so presumes them healthy), yet with
    # few jobs in flight it follows KIE's schedule: 4-second tasks end in kied within one
    # interval (2-3 s) of their end, not at the first overdue query a minute later.
    config = sim_config(duration_s=(4.0, 4.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False) as stack:
        log = logged(stack)
        jobs = await submitted(stack, 3)
        done = [await stack.wait_terminal(j["id"]) for j in jobs]
        for job, ended in zip(jobs, done, strict=True):
            assert ended.state is JobState.SUCCEEDED
            assert ended.ended_by is EndedBy.POLL
            stats = await stack.stats(str(ended.task_id))
            created = job["created_at"] - WALL0
            # (KIE's 2-3 s, and a first query spread over the job's share: 3/8 s here)
            assert log.times(str(ended.task_id))[0] <= created + 3.0 + 3 / BUDGET
            assert stats["completed_at"] <= ended.ended_at <= stats["completed_at"] + 3.0


async def test_many_jobs_stay_within_the_budget_and_overdue_ones_come_first(
    tmp_path, autojump_clock
):
    # 80 jobs of 600-s tasks, callbacks all dropped, a budget of 2 queries a second. Jobs
    # of one model typically take 20 s, of the other 1,000 s: once created, the first 40
    # are overdue and the others not.
    config = sim_config(duration_s=(600.0, 600.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False, status_queries_per_s=2.0) as stack:
        log = logged(stack)
        await trio.sleep(1)  # the new leader has seeded its health from storage
        health = stack.daemon.health_of_callbacks
        for _ in range(3):
            health.job_finished("market", "fast/model", 20.0, by="callback")
            health.job_finished("market", "slow/model", 1000.0, by="callback")
        jobs = []
        for _ in range(40):
            jobs += [await stack.submit(model="fast/model"), await stack.submit(model="slow/model")]
        tasks = await task_ids(stack, jobs)
        fast, slow = tasks[0::2], tasks[1::2]
        start = trio.current_time()
        await trio.sleep(20)
        start += 20  # every fast job is overdue now
        await trio.sleep(200)
        supervisor = stack.daemon._supervisor
        assert supervisor is not None
        budget, share_s = supervisor.budget
    assert budget == 2.0
    # 40 overdue jobs weigh 40, the 40 others 10: an overdue job gets a share of 25 s.
    assert share_s == pytest.approx(50 / 2.0)
    # Within the budget on average: a plan holds for a job's own interval, so while the
    # fleet's weight grows (jobs turning overdue, planned while they were not) the total
    # may pass it by a few per cent, and a short window by more: the client's limiter is
    # the hard cap there.
    assert len(log.between(start, start + 200)) <= 2.0 * 200 * 1.05
    assert max_rate([at for at, _ in log.queries], 20.0) <= 2.0 * 1.5
    per_job = Counter(task for _, task in log.between(start, start + 200))
    fast_rate = sum(per_job[t] for t in fast) / len(fast)
    slow_rate = sum(per_job[t] for t in slow) / len(slow)
    # Overdue jobs are queried about overdue_weight (4) times as often as the others:
    # every 25 s (8 times in 200 s), the others every 100 s.
    assert fast_rate == pytest.approx(8, abs=1)
    assert slow_rate == pytest.approx(2, abs=1)


async def test_healthy_callbacks_and_a_busy_fleet_cost_at_most_one_query_a_job(
    tmp_path, autojump_clock
):
    # 40 jobs and a budget of 1 a second (more than the 3 it could query every 3 s, until
    # the last callbacks), callbacks working, tasks of 50 s: the first query waits until a
    # job is overdue (60 s), so the callback comes first and no job is queried at all.
    # (Once no more than 3 jobs are in flight, they would follow KIE's schedule again.)
    config = sim_config(duration_s=(50.0, 50.0))
    async with open_stack(tmp_path, config, lead=False, status_queries_per_s=1.0) as stack:
        log = logged(stack)
        await trio.sleep(1)  # the new leader has seeded its health from storage
        # Callbacks are known to work: one was heard a moment ago.
        stack.daemon.health_of_callbacks.callback_received(WALL0 + trio.current_time())
        jobs = await submitted(stack, 40)
        done = [await stack.wait_terminal(j["id"]) for j in jobs]
        await trio.sleep(300)
    assert all(d.ended_by is EndedBy.CALLBACK for d in done)
    per_job = Counter(task for _, task in log.queries)
    assert all(per_job[str(d.task_id)] <= 1 for d in done)
    assert len(log.queries) <= len(done)


async def test_a_takeover_after_an_unheard_window_queries_those_jobs_first(
    tmp_path, autojump_clock
):
    # Tasks of 400 s, callbacks all dropped (status queries alone tell). A first leader
    # creates 16 "early" jobs at t=0; no instance listens from t=10 to t=20, when this
    # instance starts; it creates 4 "late" jobs at t=21 and steps down at t=22. Taking over
    # again at t=200, the early jobs (created before the gap's end) are queried at once,
    # oldest first, as fast as KIE allows; the late ones keep their schedule.
    config = sim_config(duration_s=(400.0, 400.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False) as stack:
        daemon = stack.daemon
        daemon.listening_since = WALL0 + 20.0
        await stack.store.heard_listening("previous", since=WALL0 - 1000.0, now=WALL0 + 10.0)
        log = logged(stack)
        early_jobs = []
        for _ in range(16):
            early_jobs.append(await stack.submit())
            await trio.sleep(0.01)
        early = await task_ids(stack, early_jobs)
        await trio.sleep_until(21.0)
        late = await task_ids(stack, await submitted(stack, 4))
        await trio.sleep_until(22.0)
        stack.step_down()
        await trio.sleep_until(200.0)
        stack.lead()
        await trio.sleep(40.0)
    first_of = log.firsts(200.0, 240.0)
    # 16 jobs, as fast as KIE lets a key query (the client's window), oldest first: ten at
    # once, the other six a window (1.05 s) later.
    burst, window_s = STATUS_LIMIT
    assert (burst, window_s) == (10, 1.05)
    expected = [200.0 + (i // burst) * window_s for i in range(16)]
    assert [first_of[t] for t in early] == pytest.approx(expected)
    # The late jobs, 180 s old, are queried somewhere in their interval (15-30 s), and
    # the catch-up leaves them for later: they were heard.
    assert all(first_of[t] >= 200.0 for t in late)
    assert max(first_of[t] for t in late) <= 200.0 + 30.0
    assert sum(first_of[t] <= expected[-1] for t in late) < len(late)
    assert max_rate([at for at, _ in log.between(200.0, 240.0)], 2.0) <= BUDGET * 1.5


async def test_a_takeover_without_a_gap_keeps_every_jobs_schedule(tmp_path, autojump_clock):
    config = sim_config(duration_s=(400.0, 400.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False) as stack:
        # Another instance has listened throughout (and still does).
        await stack.store.heard_listening("other", since=WALL0 - 1000.0, now=WALL0 + 10_000.0)
        stack.daemon.listening_since = WALL0 + 100.0
        log = logged(stack)
        tasks = await task_ids(stack, await submitted(stack, 16))
        await trio.sleep_until(22.0)
        stack.step_down()
        await trio.sleep_until(200.0)
        stack.lead()
        await trio.sleep(40.0)
    first_of = log.firsts(200.0, 240.0)
    assert set(first_of) == set(tasks)
    # Spread over their interval (15-30 s at 200 s old), not asked all at once.
    assert max(first_of.values()) - min(first_of.values()) > 16 / BUDGET


async def test_a_new_leader_seeds_callback_health_from_storage(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        store = stack.store
        now = WALL0 + trio.current_time()
        for i in range(5):
            job, _ = await store.create_job(
                make_new_job(model=MODEL, task_id=f"t-{i}", created_at=now - 100.0)
            )
            report = Report(
                event=E.SUCCEEDED,
                source=EndedBy.CALLBACK,
                kie_state="success",
                result_urls=("https://cdn.example/a.png",),
            )
            await store.apply(job.id, report, now=now - 100.0 + 30.0 + i)
        health = stack.daemon.health_of_callbacks
        # Before it leads, this instance knows nothing: nothing typical, presumed healthy.
        assert health.typical_duration_s("market", MODEL) is None
        stack.lead()
        await trio.sleep(1.0)
        # The new leader read it: the 90th percentile of 30..34 s.
        assert health.typical_duration_s("market", MODEL) == 34.0
        # No callback is kept in the inbox, and five finishes say callbacks did it; but
        # no callback was heard: health waits for one.
        assert not health.healthy(WALL0 + trio.current_time())


async def test_taking_over_many_jobs_freezes_them_out_of_the_collectors_sight(
    tmp_path, autojump_clock, monkeypatch
):
    monkeypatch.setattr(kied.pollers, "GC_FREEZE_JOBS", 8)
    config = sim_config(duration_s=(100.0, 100.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False) as stack:
        await stack.store.heard_listening("other", since=WALL0 - 1000.0, now=WALL0 + 10_000.0)
        log = logged(stack)
        jobs = await submitted(stack, 8)
        await task_ids(stack, jobs)
        stack.step_down()
        assert gc.get_freeze_count() == 0
        stack.lead()  # takes over 8 jobs: frozen
        await trio.sleep(1)
        assert gc.get_freeze_count() > 0
        for job in jobs:
            await stack.wait_terminal(job["id"])
        supervisor = stack.daemon._supervisor
        assert supervisor is not None
        supervisor.request_rescan()  # fewer than a quarter left: handed back
        await trio.sleep(1)
        assert gc.get_freeze_count() == 0
        assert log.queries


async def with_durations(stack: Stack, duration_s: float, count: int) -> list[str]:
    """Submit ``count`` jobs whose tasks take ``duration_s``; their task ids."""
    stack.sim.config = replace(stack.sim.config, duration_s=(duration_s, duration_s))
    return await task_ids(stack, await submitted(stack, count))


async def test_plans_made_before_the_first_callback_give_way_once_callbacks_are_seen_to_work(
    tmp_path, autojump_clock
):
    # A fresh daemon knows nothing of callbacks: it plans its first jobs on KIE's schedule,
    # spread over the budget's share (0.25 a second: four jobs make a busy fleet), first
    # queries 2-19 s after creation. The first callback (a 5-s task) shows that callbacks
    # work: the three 50-s jobs not yet queried are planned again, not before they are
    # overdue (60 s), so their callbacks come first and nothing is queried after it (kept
    # to their first plans, most of them would be queried once).
    config = sim_config(duration_s=(5.0, 5.0))
    async with open_stack(tmp_path, config, lead=False, status_queries_per_s=0.25) as stack:
        log = logged(stack)
        await trio.sleep(1)
        short = await with_durations(stack, 5.0, 1)
        long = await with_durations(stack, 50.0, 3)
        await trio.sleep(120)
        ended = {str(job.task_id): job for job in stack.store._jobs.values()}
    assert {job.ended_by for job in ended.values()} == {EndedBy.CALLBACK}
    assert set(ended) == {*short, *long}
    first_callback = ended[short[0]].ended_at - WALL0
    assert [at for at, _ in log.queries if at > first_callback] == []


async def test_jobs_left_in_flight_get_the_budget_that_ended_jobs_freed(tmp_path, autojump_clock):
    # 50 jobs of 600-s tasks, callbacks dropped, a budget of 1 a second: each job is
    # queried about every 50 s. At t=100 all but 8 end (cancelled): the 8 are planned again
    # at once, on KIE's schedule for their age (every 5-10 s), instead of sleeping out
    # intervals of up to 50 s planned for 50 jobs.
    config = sim_config(duration_s=(600.0, 600.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False, status_queries_per_s=1.0) as stack:
        log = logged(stack)
        await trio.sleep(1)
        jobs = await submitted(stack, 50)
        tasks = await task_ids(stack, jobs)
        await trio.sleep_until(100.0)
        for job in jobs[8:]:
            await stack.daemon.jobs.cancel(job["id"])
        await trio.sleep(60.0)
    first_of = log.firsts(100.0, 160.0)
    # (within their 5-10 s, and the budget's window: at most 10 queries in any 10 s)
    assert max(first_of[task] for task in tasks[:8]) <= 100.0 + 20.0
    assert max_rate([at for at, _ in log.queries], 10.0) <= 1.0


async def test_a_catch_up_goes_as_fast_as_kie_allows_within_the_budgets_window(
    tmp_path, autojump_clock
):
    # 30 jobs created before an unheard stretch, a budget of 2 a second (20 in any 10 s):
    # the catch-up asks 10 at once and 10 more a window of KIE's limit (1.05 s) later, then
    # waits for the budget's window: the other 10 come 10 s after the first.
    config = sim_config(duration_s=(400.0, 400.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False, status_queries_per_s=2.0) as stack:
        stack.daemon.listening_since = WALL0 + 100.0
        log = logged(stack)
        tasks = await task_ids(stack, await submitted(stack, 30))
        stack.step_down()
        await trio.sleep_until(200.0)
        stack.lead()
        await trio.sleep(30.0)
    first_of = log.firsts(200.0, 230.0)
    firsts = sorted(first_of[t] for t in tasks)
    assert firsts[:10] == pytest.approx([200.0] * 10)
    assert firsts[10:20] == pytest.approx([201.05] * 10)
    assert firsts[20:] == pytest.approx([210.0] * 10)
    assert max_rate([at for at, _ in log.between(200.0, 230.0)], 10.0) <= 2.0


async def test_jobs_left_few_follow_kies_schedule_again_though_callbacks_work(
    tmp_path, autojump_clock
):
    # The default budget (8 a second): 30 jobs are a busy fleet, 24 an idle one. Callbacks
    # work (they come for six 20-s jobs), so while 30 jobs are in flight none is queried
    # before it is overdue. Once the six have ended, the 24 jobs left (100-s tasks whose
    # callbacks are lost) are planned again on KIE's schedule (every 5-10 s at their age):
    # a lost callback costs seconds, not the minute the healthy schedule would wait (a
    # query at 60 s, the next at 120 s).
    lost: set[str] = set()

    async def wire(request: httpx.Request) -> list[httpx.Request]:
        task = json.loads(request.content)["data"].get("taskId")
        return [] if task in lost else [request]

    config = sim_config(duration_s=(20.0, 20.0))
    async with open_stack(tmp_path, config, lead=False, callbacks_on_the_way=wire) as stack:
        log = logged(stack)
        await trio.sleep(1)
        stack.daemon.health_of_callbacks.callback_received(WALL0 + trio.current_time())
        await with_durations(stack, 20.0, 6)
        lost.update(await with_durations(stack, 100.0, 24))
        for job_id in list(stack.store._jobs):
            await stack.wait_terminal(job_id)
        ended = {str(job.task_id): job for job in stack.store._jobs.values()}
        completed = {task: (await stack.stats(task))["completed_at"] for task in lost}
    late = [ended[task].ended_at - completed[task] for task in lost]
    assert {ended[task].ended_by for task in lost} == {EndedBy.POLL}
    assert max(late) <= 10.0
    assert [at for at, _ in log.queries if at < 21.0] == []  # busy: nothing queried


async def test_a_new_leader_plans_every_job_against_all_it_takes_over(
    tmp_path, autojump_clock, monkeypatch
):
    # 1,200 jobs taken over, their pollers started 500 at a time: every job is counted in
    # the fleet's load before any poller plans, so none plans against a part of them (to
    # be woken again as the rest come, or worse, to keep a plan made for 500).
    loads: list[int] = []
    plan = kied.pollers.planned_poll_delay

    def recorded(*args: Any, **kwargs: Any) -> tuple[float, float]:
        loads.append(kwargs["load"].jobs)
        return plan(*args, **kwargs)

    monkeypatch.setattr(kied.pollers, "planned_poll_delay", recorded)
    config = sim_config(duration_s=(600.0, 600.0), drop_callbacks=1.0)
    async with open_stack(tmp_path, config, lead=False) as stack:
        await stack.store.heard_listening("other", since=WALL0 - 1000.0, now=WALL0 + 10_000.0)
        now = WALL0 + trio.current_time()
        for i in range(1200):
            await stack.store.create_job(
                make_new_job(model=MODEL, task_id=f"t-{i}", created_at=now - 300.0)
            )
        stack.lead()
        await trio.sleep(5)
        supervisor = stack.daemon._supervisor
        assert supervisor is not None
        assert supervisor.polling == 1200
        assert supervisor._plan_epoch == 0
        assert supervisor.budget == (BUDGET, pytest.approx(1200 / BUDGET))
    assert len(loads) >= 1200
    assert set(loads) == {1200}
