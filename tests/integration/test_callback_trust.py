"""What each callback authentication mode lets a callback do, end to end.

KIE's webhook signature covers ``taskId.timestamp``, not the body nor the query. So a
signature is accepted once, and under the signature alone the body is a hint that kied
confirms with one status query to KIE before it ends the job. Under kied's callback token
the body is authenticated and applied as it comes.

kied's services, the poller supervisor and KIE's client run against kied's own simulator
(signing its callbacks), under the autojump clock, as in ``test_pollers.py``; the real
daemon behind HTTP is ``test_daemon.py``'s.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx
import trio

from kied.core.auth import kie_signature
from kied.core.jobs import EndedBy, JobState
from kied.settings import NoLockSettings
from kied.store import CallbackEffect
from kied.testing import raw_callback
from tests.conftest import wait_for
from tests.integration.test_daemon import _ready, add_job, get_job, inbox, market_callback
from tests.integration.test_pollers import WALL0, open_stack, sim_config
from tests.integration.test_submissions import leave_a_lost_submission, tasks_by_job

if TYPE_CHECKING:
    from tests.integration.test_pollers import Stack

KEY = b"webhook-hmac-key"
FORGED_URL = "https://forged.example/x.png"


def forged_success(request: httpx.Request) -> httpx.Request:
    """``request`` with its body replaced by a success naming the same task; the URL and
    the headers (KIE's signature) untouched."""
    body = json.loads(request.content)
    task_id = body["data"]["taskId"]
    data = {
        "taskId": task_id,
        "state": "success",
        "resultJson": json.dumps({"resultUrls": [FORGED_URL]}),
    }
    forged = json.dumps({"code": 200, "msg": "success", "data": data}).encode()
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return httpx.Request("POST", request.url, headers=headers, content=forged)


class Wire:
    """What happens to callbacks on their way: each is changed by ``change``, and what
    kied got is kept."""

    def __init__(self, change: Any = None) -> None:
        self.change = change
        self.stack: Stack | None = None
        self.delivered: list[httpx.Request] = []
        #: status queries KIE had answered for each task when its callback was sent
        self.queries_before: dict[str, int] = {}

    async def __call__(self, request: httpx.Request) -> list[httpx.Request]:
        assert self.stack is not None
        task_id = json.loads(request.content)["data"]["taskId"]
        stats = await self.stack.stats(task_id)
        self.queries_before[task_id] = stats["status_queries"]
        arriving = request if self.change is None else self.change(request)
        self.delivered.append(arriving)
        return [arriving]


async def test_a_signed_only_callback_is_confirmed_with_kie_before_it_ends_the_job(
    tmp_path, autojump_clock
):
    # KIE's task fails; the callback kied gets says success (its body is not signed).
    wire = Wire(forged_success)
    config = sim_config(fail_rate=1.0, hmac_key=KEY)
    async with open_stack(
        tmp_path, config, callbacks_on_the_way=wire, webhook_hmac_key=KEY
    ) as stack:
        wire.stack = stack
        t0 = trio.current_time()
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
        # KIE's truth, read at once: one status query more than before the callback.
        assert (done.state, done.ended_by) == (JobState.FAILED, EndedBy.CALLBACK_CONFIRMED)
        assert done.result_urls == ()
        assert done.error_code is not None
        assert done.ended_at == WALL0 + t0 + 60
        assert done.confirm_requested_at == WALL0 + t0 + 60
        assert len(wire.delivered) == 1
        assert (await stack.stats(done.task_id))["status_queries"] == wire.queries_before[
            done.task_id
        ] + 1
        [row] = await stack.store.list_callbacks(task_id=done.task_id)
        assert (row.entry.auth, row.effect, row.matched_job_id) == (
            "hmac",
            CallbackEffect.CONFIRMING,
            done.id,
        )
        assert row.entry.outcome == "success"  # what it said, kept

        # The same signed callback again, within its window: a replay, changes nothing
        # and asks KIE nothing.
        queries = (await stack.stats(done.task_id))["status_queries"]
        record = (await stack.daemon.callbacks.handle(await raw_callback(wire.delivered[0]))).record
        assert record is not None
        assert (record.effect, record.job) == (CallbackEffect.REJECTED, None)
        [replayed, _] = await stack.store.list_callbacks(task_id=done.task_id)
        assert (replayed.entry.auth, replayed.entry.authenticated) == (
            "rejected: replayed signature",
            False,
        )
        await trio.sleep(60)
        assert (await stack.stats(done.task_id))["status_queries"] == queries
        assert await stack.job(done.id) == done


async def test_a_signed_only_callback_that_kie_confirms_ends_the_job_with_kies_results(
    tmp_path, autojump_clock
):
    wire = Wire()
    config = sim_config(hmac_key=KEY)
    async with open_stack(
        tmp_path, config, callbacks_on_the_way=wire, webhook_hmac_key=KEY
    ) as stack:
        wire.stack = stack
        t0 = trio.current_time()
        jobs = [(await stack.submit())["id"] for _ in range(3)]
        for job_id in jobs:
            done = await stack.wait_terminal(job_id)
            assert (done.state, done.ended_by) == (JobState.SUCCEEDED, EndedBy.CALLBACK_CONFIRMED)
            assert done.ended_at == WALL0 + t0 + 60
            assert done.result_urls
            queries = (await stack.stats(done.task_id))["status_queries"]
            assert queries == wire.queries_before[done.task_id] + 1
        # A callback whose outcome was read at once tells how long jobs take, as a
        # callback does: the poll schedule relies on it.
        health = stack.daemon.health_of_callbacks
        assert health.typical_duration_s("market", "google/nano-banana") == 60


class LaggingStatus(httpx.AsyncBaseTransport):
    """KIE's API, whose status answers still say "generating" ``lag`` more times."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.lag = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.lag == 0 or not request.url.path.endswith("/recordInfo"):
            return response
        self.lag -= 1
        body = json.loads(await response.aread())
        body["data"] |= {"state": "generating", "resultJson": None}
        return httpx.Response(response.status_code, json=body)


async def test_a_status_that_lags_behind_the_callback_is_asked_again_soon(tmp_path, autojump_clock):
    def lag_twice(request: httpx.Request) -> httpx.Request:
        lagging.lag = 2  # the next two status answers do not know the outcome yet
        return request

    wire = Wire(lag_twice)
    config = sim_config(hmac_key=KEY)
    async with open_stack(
        tmp_path, config, lead=False, callbacks_on_the_way=wire, webhook_hmac_key=KEY
    ) as stack:
        wire.stack = stack
        lagging = LaggingStatus(stack.daemon._kie_transport)
        stack.daemon._kie_transport = lagging
        t0 = trio.current_time()
        stack.lead()
        done = await stack.wait_terminal((await stack.submit())["id"])
        # asked at once, then 2 s and 4 s later
        assert (done.state, done.ended_by) == (JobState.SUCCEEDED, EndedBy.CALLBACK_CONFIRMED)
        assert done.ended_at == WALL0 + t0 + 60 + 2 + 4
        queries = (await stack.stats(done.task_id))["status_queries"]
        assert queries == wire.queries_before[done.task_id] + 3


async def test_under_the_callback_token_the_body_is_applied_as_it_comes(tmp_path, autojump_clock):
    # The token rides in kied's own callback URL: the body is authenticated, so even a
    # body that differs from KIE's status is applied without asking KIE.
    wire = Wire(forged_success)
    config = sim_config(fail_rate=1.0, hmac_key=KEY)
    async with open_stack(
        tmp_path,
        config,
        callbacks_on_the_way=wire,
        webhook_hmac_key=KEY,
        callback_token="s3cret",
    ) as stack:
        wire.stack = stack
        done = await stack.wait_terminal((await stack.submit())["id"])
        assert (done.state, done.ended_by, done.result_urls) == (
            JobState.SUCCEEDED,
            EndedBy.CALLBACK,
            (FORGED_URL,),
        )
        assert done.confirm_requested_at is None
        assert (await stack.stats(done.task_id))["status_queries"] == wire.queries_before[
            done.task_id
        ]
        [row] = await stack.store.list_callbacks(task_id=done.task_id)
        assert (row.entry.auth, row.effect) == ("token+hmac", CallbackEffect.CHANGED)


async def test_a_late_signed_only_callback_is_confirmed_for_a_timed_out_job(
    tmp_path, autojump_clock
):
    # The task takes longer than the job's deadline; its signed callback comes late.
    wire = Wire()
    config = sim_config(duration_s=(1200.0, 1200.0), hmac_key=KEY)
    async with open_stack(
        tmp_path, config, callbacks_on_the_way=wire, webhook_hmac_key=KEY
    ) as stack:
        wire.stack = stack
        t0 = trio.current_time()
        job = await stack.submit()
        timed_out = await stack.wait_terminal(job["id"])
        assert timed_out.state is JobState.TIMED_OUT
        await trio.sleep(1200 - (trio.current_time() - t0) + 1)
        late = await stack.job(job["id"])
        assert (late.state, late.ended_by, late.late) == (
            JobState.SUCCEEDED,
            EndedBy.CALLBACK_CONFIRMED,
            True,
        )
        assert late.ended_at == WALL0 + t0 + 1200
        queries = (await stack.stats(late.task_id))["status_queries"]
        assert queries == wire.queries_before[late.task_id] + 1


async def test_a_lost_createtask_adopts_its_signed_only_callbacks_task_and_confirms_it(
    tmp_path, autojump_clock
):
    # The orphan task fails; its callback kied gets says success.
    wire = Wire(forged_success)
    config = sim_config(hmac_key=KEY)
    async with open_stack(
        tmp_path, config, lead=False, callbacks_on_the_way=wire, webhook_hmac_key=KEY
    ) as stack:
        wire.stack = stack
        job_id = (await stack.submit())["id"]
        orphan = await leave_a_lost_submission(stack, job_id, duration_s=40.0, outcome="fail")
        t0 = trio.current_time()
        stack.lead()
        done = await stack.wait_terminal(job_id)
        assert trio.current_time() - t0 == 40.0  # as soon as the orphan called back
        assert (done.state, done.task_id, done.ended_by, done.result_urls) == (
            JobState.FAILED,
            orphan,
            EndedBy.CALLBACK_CONFIRMED,
            (),
        )
        assert (await stack.stats(orphan))["status_queries"] == 1
        assert await tasks_by_job(stack) == {job_id: 1}
        [row] = await stack.store.list_callbacks(task_id=orphan)
        assert row.effect is CallbackEffect.CONFIRMING


# ------------------------------------------------------------------- the daemon over HTTP


async def test_a_replayed_signed_callback_with_a_forged_body_changes_nothing(
    settings, start_daemon
):
    # token+hmac: the body is trusted, so a replay carrying a captured token and
    # signature would be applied as it comes, were the signature not accepted once.
    await add_job(settings, "j-replay", "t-replay")
    daemon = await start_daemon(
        settings, webhook_hmac_key=KEY, callback_token="s3cret", lock=NoLockSettings()
    )
    ts = str(int(time.time()))
    signed = {
        "X-Webhook-Timestamp": ts,
        "X-Webhook-Signature": kie_signature(KEY, "t-replay", ts),
    }
    progress = json.dumps(
        {"code": 200, "msg": "running", "data": {"taskId": "t-replay", "state": "generating"}}
    ).encode()
    async with daemon.client() as http:
        await wait_for(lambda: _ready(http))
        url = "/callbacks/kie?job=j-replay&token=s3cret"
        r = await http.post(url, content=progress, headers=signed)
        assert r.status_code == 200
        r = await http.post(url, content=market_callback("t-replay"), headers=signed)
        assert r.status_code == 200
    await daemon.shutdown()
    job = await get_job(settings, "j-replay")
    assert (job.state, job.result_urls) == (JobState.PENDING, ())
    rows = list(reversed(await inbox(settings)))
    assert [(r.entry.auth, r.effect) for r in rows] == [
        ("token+hmac", CallbackEffect.CHANGED),
        ("rejected: replayed signature", CallbackEffect.REJECTED),
    ]
