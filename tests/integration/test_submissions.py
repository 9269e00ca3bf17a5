"""One paid generation per job, in one process under the autojump clock.

kied's services, the poller supervisor and KIE's client against kied's own simulator,
answering createTask late (``create_delay_s``), as in ``tests/integration/test_pollers.py``.
A leader that died with a createTask in flight is played by writing what it left in
storage (the submission it recorded, and the task KIE created for it) before the next
leader starts.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from kied.api import callback_url
from kied.core.jobs import EndedBy, JobId, JobState, TaskId
from kied.kie.simulator import Family as SimFamily
from kied.kie.simulator import TaskOverrides
from kied.pollers import LOST_SUBMISSION, NOT_SENT
from kied.store import CallbackEffect
from tests.conftest import wait_for
from tests.integration.test_pollers import WALL0, open_stack, sim_config, wall_clock

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tests.integration.test_pollers import Stack


def stepped_down(stack: Stack) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        await trio.lowlevel.checkpoint()
        return stack.daemon._supervisor is None

    return check


def metric(stack: Stack, name: str, **labels: str) -> float:
    value = stack.daemon.metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


async def tasks_by_job(stack: Stack) -> Counter[str]:
    """How many tasks the simulator created for each job (its callback URL names the job)."""
    stats = (await stack.api.get("/_sim/stats")).json()
    jobs: Counter[str] = Counter()
    for task in stats["tasks"].values():
        url = httpx.URL(task["callback_url"])
        jobs[url.params["job"]] += 1
    return jobs


async def leave_a_lost_submission(
    stack: Stack, job_id: str, *, duration_s: float, outcome: str = "success"
) -> str:
    """What a leader killed while createTask was in flight leaves: the submission it
    recorded, and the task KIE created for it, whose answer nobody read."""
    job = await stack.job(job_id)
    url = callback_url(stack.daemon.settings, job.id)
    marked = await stack.store.begin_submission(
        job.id, count=job.submit_count, callback_url=url, now=wall_clock()
    )
    assert marked is not None
    body = {"model": job.model, "callBackUrl": url, "input": {"prompt": "a red bicycle"}}
    reply = stack.sim.create_task(
        SimFamily.MARKET,
        json.dumps(body).encode(),
        authorization="Bearer test-key",
        overrides=TaskOverrides(duration_s=duration_s, outcome=outcome),
    )
    return str(json.loads(reply.body)["data"]["taskId"])


async def test_a_stopping_leader_stores_the_tasks_of_the_creates_in_flight(
    tmp_path, autojump_clock
):
    async with open_stack(tmp_path, sim_config(create_delay_s=3.0), lead=False) as stack:
        jobs = [(await stack.submit())["id"] for _ in range(10)]
        stack.lead()
        await trio.sleep(1)  # every createTask is sent, none answered
        assert (await stack.api.get("/_sim/stats")).json()["totals"]["tasks"] == 10
        assert all([(await stack.job(j)).submission_in_flight for j in jobs])

        stopped_at = trio.current_time()
        stack.daemon.stopping()
        stack.step_down()
        await wait_for(stepped_down(stack), within_s=60)
        # The leader waited for KIE's answers (2 s more) and stored every task id.
        assert 2.0 <= trio.current_time() - stopped_at <= 2.05
        for job_id in jobs:
            job = await stack.job(job_id)
            assert (job.state, job.submission_in_flight, job.submit_count) == (
                JobState.PENDING,
                False,
                1,
            )
            assert job.task_id is not None

        stack.lead()  # the next leader
        ended = [await stack.wait_terminal(j) for j in jobs]
        assert {job.state for job in ended} == {JobState.SUCCEEDED}
        assert await tasks_by_job(stack) == dict.fromkeys(jobs, 1)


async def test_a_stopping_leader_sends_no_new_createtask(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(create_delay_s=1.0), lead=False) as stack:
        # 25 jobs: the rate limit lets 20 through, 5 wait for the next window
        jobs = [(await stack.submit())["id"] for _ in range(25)]
        stack.lead()
        await trio.sleep(0.5)
        stack.daemon.stopping()
        stack.step_down()
        await trio.sleep(30)
        assert (await stack.api.get("/_sim/stats")).json()["totals"]["tasks"] == 20
        waiting = [await stack.job(j) for j in jobs]
        assert sorted((j.submit_count, j.task_id is None) for j in waiting) == [
            *[(0, True)] * 5,
            *[(1, False)] * 20,
        ]


async def test_a_stop_that_cannot_wait_for_createtask_leaves_it_to_the_next_leader(
    tmp_path, autojump_clock
):
    # KIE answers createTask after 30 s; the stop's budget is 10 s, so the leader leaves
    # without the answers. The next leader does not create them again: the tasks' own
    # callbacks, which name their jobs, give the jobs their tasks.
    config = sim_config(create_delay_s=30.0, duration_s=(90.0, 90.0))
    async with open_stack(tmp_path, config, lead=False) as stack:
        jobs = [(await stack.submit())["id"] for _ in range(10)]
        stack.lead()
        await trio.sleep(1)
        t_stop = trio.current_time()
        stack.daemon.stopping()
        stack.step_down()
        await wait_for(stepped_down(stack), within_s=60)
        assert 6.0 <= trio.current_time() - t_stop <= 6.05  # 10 s less 2 x cleanup_s
        assert all([(await stack.job(j)).submission_in_flight for j in jobs])

        stack.lead()
        took_over = trio.current_time()
        ended = [await stack.wait_terminal(j) for j in jobs]
        assert {(job.state, job.ended_by) for job in ended} == {
            (JobState.SUCCEEDED, EndedBy.CALLBACK)
        }
        # adopted when each task called back, 90 s after it was created
        assert trio.current_time() - took_over < 90
        assert await tasks_by_job(stack) == dict.fromkeys(jobs, 1)
        assert metric(stack, "kied_lost_submissions_total", resolution="adopted") == 10
        assert metric(stack, "kied_lost_submissions_total", resolution="recreated") == 0
        assert metric(stack, "kied_task_adoptions_total") == 10


async def test_after_a_crash_the_orphan_task_is_adopted_not_paid_twice(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        job_id = (await stack.submit())["id"]
        orphan = await leave_a_lost_submission(stack, job_id, duration_s=40.0)
        t0 = trio.current_time()
        stack.lead()
        done = await stack.wait_terminal(job_id)
        assert trio.current_time() - t0 == 40.0  # as soon as the orphan called back
        assert (done.state, done.task_id, done.ended_by) == (
            JobState.SUCCEEDED,
            orphan,
            EndedBy.CALLBACK,
        )
        assert done.result_urls
        assert await tasks_by_job(stack) == {job_id: 1}
        assert metric(stack, "kied_lost_submissions_total", resolution="adopted") == 1
        assert metric(stack, "kied_create_task_calls_total", result="created") == 0


async def test_never_waits_for_the_orphan_until_the_deadline(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        job_id = (await stack.submit(timeout_s=300))["id"]
        orphan = await leave_a_lost_submission(stack, job_id, duration_s=400.0)
        stack.lead()
        done = await stack.wait_terminal(job_id)
        assert (done.state, done.ended_by, done.task_id) == (
            JobState.TIMED_OUT,
            EndedBy.DEADLINE,
            None,
        )
        assert done.ended_at == done.deadline_at
        assert done.error_code == LOST_SUBMISSION
        assert "KIED_RESUBMIT=never" in (done.error_message or "")
        assert metric(stack, "kied_lost_submissions_total", resolution="given_up") == 1
        # The orphan calls back late: the job takes its task and result after all.
        await trio.sleep(200)
        late = await stack.job(job_id)
        assert (late.state, late.task_id, late.late) == (JobState.SUCCEEDED, orphan, True)
        assert await tasks_by_job(stack) == {job_id: 1}


async def test_without_callbacks_a_lost_createtask_fails_the_job_once_no_answer_can_come(
    tmp_path, autojump_clock
):
    async with open_stack(tmp_path, sim_config(), lead=False, public_url=None) as stack:
        job_id = (await stack.submit())["id"]
        job = await stack.job(job_id)
        sent = await stack.store.begin_submission(
            job.id, count=0, callback_url=None, now=wall_clock()
        )
        assert sent is not None
        t0 = trio.current_time()
        stack.lead()
        done = await stack.wait_terminal(job_id)
        # Its sender could still have stored an answer for 45 s; then nothing can come.
        assert trio.current_time() - t0 == 45.0
        assert (done.state, done.ended_by, done.error_code) == (
            JobState.FAILED,
            EndedBy.SUBMIT,
            LOST_SUBMISSION,
        )
        assert "KIED_PUBLIC_URL" in (done.error_message or "")
        assert (await stack.api.get("/_sim/stats")).json()["totals"]["tasks"] == 0


async def test_after_wait_creates_again_and_the_job_stays_on_one_task(tmp_path, autojump_clock):
    changes: dict[str, Any] = {"resubmit": "after-wait", "resubmit_wait_s": 120.0}
    async with open_stack(tmp_path, sim_config(), lead=False, **changes) as stack:
        job_id = (await stack.submit())["id"]
        orphan = await leave_a_lost_submission(stack, job_id, duration_s=300.0)
        t0 = trio.current_time()
        stack.lead()
        await trio.sleep(121)
        job = await stack.job(job_id)
        assert job.task_id is not None
        assert job.task_id != orphan
        assert job.submit_count == 2
        assert metric(stack, "kied_lost_submissions_total", resolution="recreated") == 1
        # The old leader's createTask answer arrives late: it is kept, not applied.
        attached = await stack.store.attach_task(job.id, TaskId(orphan), now=wall_clock())
        assert attached is not None
        assert (attached.job.task_id, attached.job.other_task_ids) == (job.task_id, (orphan,))
        done = await stack.wait_terminal(job_id)
        assert (done.state, done.task_id) == (JobState.SUCCEEDED, job.task_id)
        assert trio.current_time() - t0 == 120.0 + 60.0  # the second task's own callback
        # The orphan's callback (at 300 s) names the job, and changes nothing.
        await trio.sleep(300)
        after = await stack.job(job_id)
        assert (after.task_id, after.result_urls, after.other_task_ids) == (
            done.task_id,
            done.result_urls,
            (orphan,),
        )
        trail = await stack.store.list_callbacks(task_id=TaskId(orphan))
        assert [(c.effect, c.matched_job_id) for c in trail] == [
            (CallbackEffect.OTHER_TASK, JobId(job_id))
        ]
        assert metric(stack, "kied_other_tasks_total", source="callback") == 1
        assert await tasks_by_job(stack) == {job_id: 2}


async def test_a_createtask_without_an_answer_is_not_sent_again(tmp_path, autojump_clock):
    # KIE takes the request, creates the task, and the connection breaks before the answer.
    async with open_stack(tmp_path, sim_config(duration_s=(20.0, 20.0)), lead=False) as stack:
        real = stack.daemon._kie_transport
        assert real is not None
        sent: list[str] = []

        class AnswerLost(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                response = await real.handle_async_request(request)
                if request.method == "POST":
                    sent.append(str(request.url))
                    raise httpx.ReadError("connection reset by peer", request=request)
                return response

        stack.daemon._kie_transport = AnswerLost()
        job_id = (await stack.submit())["id"]
        t0 = trio.current_time()
        stack.lead()
        done = await stack.wait_terminal(job_id)
        assert trio.current_time() - t0 == 20.0
        assert (done.state, done.ended_by) == (JobState.SUCCEEDED, EndedBy.CALLBACK)
        assert len(sent) == 1
        assert await tasks_by_job(stack) == {job_id: 1}
        assert metric(stack, "kied_lost_submissions_total", resolution="adopted") == 1


async def test_a_busy_answer_is_retried_it_created_nothing(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        real = stack.daemon._kie_transport
        assert real is not None
        refused = 0

        class BusyTwice(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                nonlocal refused
                if request.method == "POST" and refused < 2:
                    refused += 1
                    return httpx.Response(200, json={"code": 429, "msg": "rate limited"})
                return await real.handle_async_request(request)

        stack.daemon._kie_transport = BusyTwice()
        job_id = (await stack.submit())["id"]
        stack.lead()
        done = await stack.wait_terminal(job_id)
        assert done.state is JobState.SUCCEEDED
        assert (done.submit_count, done.submission_in_flight) == (3, False)
        assert await tasks_by_job(stack) == {job_id: 1}


async def test_a_callback_before_the_createtask_answer_is_the_same_task(tmp_path, autojump_clock):
    # The task ends (1 s) before KIE answers createTask (5 s): its callback names the job,
    # which takes the task; the answer then names the same task.
    config = sim_config(create_delay_s=5.0, duration_s=(1.0, 1.0))
    async with open_stack(tmp_path, config) as stack:
        t0 = trio.current_time()
        job_id = (await stack.submit())["id"]
        done = await stack.wait_terminal(job_id)
        assert trio.current_time() - t0 == 1.0
        assert (done.state, done.ended_by, done.other_task_ids) == (
            JobState.SUCCEEDED,
            EndedBy.CALLBACK,
            (),
        )
        await trio.sleep(10)
        after = await stack.job(job_id)
        assert (after.task_id, after.other_task_ids, after.submission_in_flight) == (
            done.task_id,
            (),
            False,
        )
        assert await tasks_by_job(stack) == {job_id: 1}
        assert metric(stack, "kied_task_adoptions_total") == 1
        assert done.ended_at == WALL0 + t0 + 1.0


async def test_a_burst_of_jobs_waits_in_kieds_queue_without_burning_its_deadline(
    tmp_path, autojump_clock
):
    # 200 jobs at once, with KIE's limit (20 new tasks per 10.5 s): the last 20 wait
    # 94.5 s in kied's createTask queue, longer than their 60-s timeout.
    config = sim_config(duration_s=(4.0, 4.0))
    async with open_stack(tmp_path, config, job_timeout_s=60.0) as stack:
        jobs = [await stack.submit() for _ in range(200)]
        await trio.sleep(50)
        # Five windows sent, five to go. A queued job's deadline is its timeout from its
        # creation, provisionally: the wait is added when its createTask is sent.
        queued = [await stack.job(j["id"]) for j in jobs]
        queued = [j for j in queued if j.submit_count == 0]
        assert len(queued) == 100
        assert {(j.state, round(j.deadline_at - j.created_at, 3)) for j in queued} == {
            (JobState.SUBMITTING, 60.0)
        }
        ended = [await stack.wait_terminal(j["id"]) for j in jobs]
        assert {j.state for j in ended} == {JobState.SUCCEEDED}
        # Each deadline is the 60-s timeout from its createTask: the wait in the queue
        # (0, 10.5, ... 94.5 s, twenty jobs each) is not counted.
        waits = sorted(round(j.deadline_at - j.created_at - 60.0, 3) for j in ended)
        assert waits == [round(10.5 * (i // 20), 3) for i in range(200)]


async def test_a_job_waits_in_kieds_queue_no_longer_than_the_queue_bound(tmp_path, autojump_clock):
    # 40 jobs, 20 per window: the second twenty would wait 10.5 s, but the queue holds a
    # job at most 5 s (or its timeout, 2 s here, when longer).
    config = sim_config(duration_s=(1.0, 1.0))
    async with open_stack(tmp_path, config, job_timeout_s=2.0, create_queue_max_s=5.0) as stack:
        t0 = trio.current_time()
        jobs = [await stack.submit() for _ in range(40)]
        ended = [await stack.wait_terminal(j["id"]) for j in jobs]
        states = sorted((j.state.value, j.submit_count) for j in ended)
        assert states == [("succeeded", 1)] * 20 + [("timed_out", 0)] * 20
        timed_out = [j for j in ended if j.state is JobState.TIMED_OUT]
        assert {round(j.ended_at - j.created_at, 3) for j in timed_out} == {5.0}
        assert {j.ended_by for j in timed_out} == {EndedBy.DEADLINE}
        assert trio.current_time() - t0 == pytest.approx(5.0)
        # The job says why: it never left kied's queue.
        assert {j.error_code for j in timed_out} == {NOT_SENT}
        assert {j.error_message for j in timed_out} == {
            "waited 5 s in kied's createTask queue (KIE takes 20 new tasks per 10 s from a"
            " key) and was never sent: the job's deadline, or KIED_CREATE_QUEUE_MAX (5 s),"
            " passed first"
        }
        assert {j.error_code for j in ended if j.state is JobState.SUCCEEDED} == {None}
