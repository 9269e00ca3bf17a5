"""The KIE client, against kied's own simulator and against hand-written answers.

Everything runs in-process under the autojump clock: the simulator's app through
``httpx.ASGITransport``, its callbacks into an ``httpx.MockTransport``, and the table of
KIE's answers through ``httpx.MockTransport``. No sockets, no threads: virtual time is exact.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing

from kied.core.callbacks import Outcome
from kied.core.families import SPECS, Family
from kied.core.jobs import TaskId
from kied.errors import (
    UpstreamBusyError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
)
from kied.kie.client import KieClient, KieClientSettings, TaskStatus, open_kie_client
from kied.kie.simulator import Family as SimFamily
from kied.kie.simulator import Simulator, SimulatorConfig, StatusErrorKind, create_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

WALL0 = 1_767_225_600.0
API = "http://kie.test"
HOOK = "http://hooks.test/callbacks/kie?job=j1&token=t"
KEY = "sk-test-5ecret-do-not-log"


def wall_clock() -> float:
    return WALL0 + trio.current_time()


def client_settings(**changes: Any) -> KieClientSettings:
    return replace(KieClientSettings(base_url=API, api_key=KEY), **changes)


def sim_config(**changes: Any) -> SimulatorConfig:
    return replace(SimulatorConfig(duration_s=(60.0, 60.0), seed=1), **changes)


@dataclass
class Hooks:
    """The callbacks the simulator POSTs, with the trio time each arrived."""

    calls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((trio.current_time(), json.loads(await request.aread())))
        self.arrived.set()
        return httpx.Response(200, json={"status": "received"})

    async def call_at(self, at: float) -> dict[str, Any]:
        """The body of the callback that arrived at trio time ``at``, waiting for it."""
        while True:
            for when, body in self.calls:
                if when == at:
                    return body
            self.arrived = trio.Event()
            await self.arrived.wait()


@asynccontextmanager
async def open_simulated_kie(
    config: SimulatorConfig, *, api_key: str | None = KEY
) -> AsyncIterator[tuple[Simulator, KieClient, Hooks]]:
    """The simulator running in-process, and a KieClient that reaches it in memory."""
    hooks = Hooks()
    async with httpx.AsyncClient(transport=httpx.MockTransport(hooks.handle)) as hook_client:
        sim = Simulator(config, client=hook_client, now=wall_clock, base_url=API)
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            # Quart's ASGI types are narrower than httpx's; the app is a plain ASGI callable.
            transport = httpx.ASGITransport(app=create_app(sim))  # type: ignore[arg-type]
            async with open_kie_client(
                client_settings(api_key=api_key), transport=transport
            ) as kie:
                yield sim, kie, hooks
            nursery.cancel_scope.cancel()


#: What each simulated family is asked to make: (model, input).
REQUESTS: dict[SimFamily, tuple[str | None, dict[str, Any]]] = {
    SimFamily.MARKET: ("google/nano-banana", {"prompt": "a red bicycle"}),
    SimFamily.VEO: ("veo3_fast", {"prompt": "a lighthouse", "aspectRatio": "16:9"}),
    SimFamily.RUNWAY: (None, {"prompt": "waves", "duration": 5, "quality": "720p"}),
    SimFamily.ALEPH: (None, {"prompt": "snow", "videoUrl": "https://in.test/v.mp4"}),
    SimFamily.SUNO: ("V4", {"prompt": "neon rain", "customMode": False, "instrumental": False}),
    SimFamily.GPT4O: (None, {"prompt": "a fox", "size": "1:1"}),
    SimFamily.FLUX_KONTEXT: (None, {"prompt": "a fox", "aspectRatio": "16:9"}),
    SimFamily.MIDJOURNEY: (None, {"prompt": "a fox", "taskType": "mj_txt2img"}),
    SimFamily.LUMA: (None, {"prompt": "rain", "videoUrl": "https://in.test/v.mp4"}),
}

SIM_FAMILIES = list(SimFamily)


def core(family: SimFamily) -> Family:
    return Family(family.value)


# ============================================================================================
# Against the simulator


@pytest.mark.parametrize("sim_family", SIM_FAMILIES, ids=[f.value for f in SIM_FAMILIES])
async def test_create_then_poll_to_success(
    sim_family: SimFamily, autojump_clock: trio.testing.MockClock
) -> None:
    family = core(sim_family)
    model, payload = REQUESTS[sim_family]
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config()) as (sim, kie, hooks):
            t0 = trio.current_time()
            task_id = await kie.create_task(family, model=model, input=payload, callback_url=HOOK)
            assert sim.has_task(task_id)
            assert sim.stats(task_id)["tasks"][task_id]["callback_url"] == HOOK

            await trio.sleep_until(t0 + 1)
            early = await kie.get_status(family, task_id)
            assert early.reading is not None
            assert early.reading.outcome is Outcome.PENDING
            assert early.reading.result_urls == ()

            await trio.sleep_until(t0 + 60)
            done = await kie.get_status(family, task_id)
            assert done.reading is not None
            assert done.reading.outcome is Outcome.SUCCESS, done.reading
            assert done.reading.result_urls
            assert all(
                u.startswith(f"{API}/_sim/files/{task_id}/") for u in done.reading.result_urls
            )
            assert done.reading.error_code is None
            assert sim.stats(task_id)["tasks"][task_id]["status_queries"] == 2
            # the callback URL was honoured, at the moment the task finished
            callback = await hooks.call_at(t0 + 60)
            assert task_id in json.dumps(callback)
            assert callback["code"] == 200


async def test_suno_stages_before_success_read_pending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config()) as (_, kie, _hooks):
            t0 = trio.current_time()
            model, payload = REQUESTS[SimFamily.SUNO]
            task_id = await kie.create_task(
                Family.SUNO, model=model, input=payload, callback_url=None
            )
            seen = []
            for at in (1, 25, 45, 60):
                await trio.sleep_until(t0 + at)
                status = await kie.get_status(Family.SUNO, task_id)
                assert status.reading is not None
                seen.append((status.reading.kie_state, status.reading.outcome))
            assert seen == [
                ("PENDING", Outcome.PENDING),
                ("TEXT_SUCCESS", Outcome.PENDING),
                ("FIRST_SUCCESS", Outcome.PENDING),
                ("SUCCESS", Outcome.SUCCESS),
            ]


@pytest.mark.parametrize("sim_family", SIM_FAMILIES, ids=[f.value for f in SIM_FAMILIES])
async def test_create_then_poll_to_failure(
    sim_family: SimFamily, autojump_clock: trio.testing.MockClock
) -> None:
    family = core(sim_family)
    model, payload = REQUESTS[sim_family]
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config(fail_rate=1.0)) as (_, kie, _hooks):
            t0 = trio.current_time()
            task_id = await kie.create_task(family, model=model, input=payload, callback_url=None)
            await trio.sleep_until(t0 + 59)
            pending = await kie.get_status(family, task_id)
            assert pending.reading is not None
            assert pending.reading.outcome is Outcome.PENDING
            await trio.sleep_until(t0 + 60)
            failed = await kie.get_status(family, task_id)
            assert failed.reading is not None
            assert failed.reading.outcome is Outcome.FAIL, failed.reading
            assert failed.reading.error_message
            assert failed.reading.result_urls == ()


async def test_a_task_kie_does_not_know_reads_none(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config()) as (_, kie, _hooks):
            for family in (Family.MARKET, Family.VEO, Family.RUNWAY, Family.SUNO):
                assert await kie.get_status(family, TaskId("no-such-task")) == TaskStatus(
                    reading=None
                )
            # a Market task asked about on Veo's endpoint is unknown there too
            model, payload = REQUESTS[SimFamily.MARKET]
            task_id = await kie.create_task(
                Family.MARKET, model=model, input=payload, callback_url=None
            )
            assert (await kie.get_status(Family.VEO, task_id)).reading is None
            assert (await kie.get_status(Family.MARKET, task_id)).reading is not None


@pytest.mark.parametrize("api_key", [None, ""])
async def test_no_api_key_is_rejected_with_401(
    api_key: str | None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config(), api_key=api_key) as (sim, kie, _hooks):
            model, payload = REQUESTS[SimFamily.VEO]
            with pytest.raises(UpstreamRejectedError, match="KIE API key rejected") as caught:
                await kie.create_task(Family.VEO, model=model, input=payload, callback_url=HOOK)
            assert caught.value.code == 401
            with pytest.raises(UpstreamRejectedError, match="KIE API key rejected") as caught:
                await kie.get_status(Family.VEO, TaskId("veo_x"))
            assert caught.value.code == 401
            assert sim.stats()["totals"]["tasks"] == 0


async def test_a_create_kie_refuses_is_rejected(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config()) as (_, kie, _hooks):
            with pytest.raises(UpstreamRejectedError, match="model is required") as caught:
                await kie.create_task(
                    Family.MARKET, model=None, input={"prompt": "x"}, callback_url=None
                )
            assert caught.value.code == 422
            with pytest.raises(UpstreamRejectedError, match="callBackUrl") as caught:
                await kie.create_task(
                    Family.VEO, model=None, input={"prompt": "x"}, callback_url="ftp://nope"
                )
            assert caught.value.code == 422


STATUS_ERRORS: dict[StatusErrorKind, tuple[int, float | None]] = {
    StatusErrorKind.HTTP_429: (429, None),
    StatusErrorKind.ENVELOPE_429: (429, None),
    StatusErrorKind.ENVELOPE_455: (455, None),
    StatusErrorKind.ENVELOPE_500: (500, None),
    StatusErrorKind.HTTP_500: (500, None),
    StatusErrorKind.HTTP_502: (502, None),
    StatusErrorKind.HTTP_503: (503, 5.0),
}


def test_every_simulated_status_error_is_covered() -> None:
    assert set(STATUS_ERRORS) == set(StatusErrorKind)


@pytest.mark.parametrize("kind", list(StatusErrorKind), ids=[k.value for k in StatusErrorKind])
async def test_simulated_status_errors_are_busy(
    kind: StatusErrorKind, autojump_clock: trio.testing.MockClock
) -> None:
    code, retry_after_s = STATUS_ERRORS[kind]
    config = sim_config(status_errors=1.0, status_error_kinds=(kind,))
    with trio.fail_after(600):
        async with open_simulated_kie(config) as (sim, kie, _hooks):
            model, payload = REQUESTS[SimFamily.RUNWAY]
            # creates are not affected
            task_id = await kie.create_task(
                Family.RUNWAY, model=model, input=payload, callback_url=None
            )
            with pytest.raises(UpstreamBusyError) as caught:
                await kie.get_status(Family.RUNWAY, task_id)
            assert type(caught.value) is UpstreamBusyError
            assert caught.value.code == code
            assert caught.value.retry_after_s == retry_after_s
            assert task_id in str(caught.value)
            assert sim.stats(task_id)["tasks"][task_id]["status_errors"] == 1


async def test_all_simulated_status_errors_at_once_are_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        async with open_simulated_kie(sim_config(status_errors=1.0)) as (_, kie, _hooks):
            model, payload = REQUESTS[SimFamily.MARKET]
            task_id = await kie.create_task(
                Family.MARKET, model=model, input=payload, callback_url=None
            )
            codes = set()
            for _ in range(60):
                with pytest.raises(UpstreamBusyError) as caught:
                    await kie.get_status(Family.MARKET, task_id)
                codes.add(caught.value.code)
            assert codes == {429, 455, 500, 502, 503}


# ============================================================================================
# Requests: paths, bodies, headers


@dataclass
class Recorder:
    """A fake KIE that records every request and answers ``reply(request)``."""

    reply: Callable[[httpx.Request], httpx.Response]
    requests: list[httpx.Request]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return self.reply(request)


def accept(request: httpx.Request) -> httpx.Response:
    if request.method == "POST":
        return httpx.Response(200, json={"code": 200, "msg": "success", "data": {"taskId": "t-1"}})
    return httpx.Response(
        200, json={"code": 200, "msg": "success", "data": {"taskId": "t-1", "state": "waiting"}}
    )


@asynccontextmanager
async def open_fake_kie(
    reply: Callable[[httpx.Request], httpx.Response] = accept, **changes: Any
) -> AsyncIterator[tuple[KieClient, Recorder]]:
    recorder = Recorder(reply, [])
    transport = httpx.MockTransport(recorder.handle)
    async with open_kie_client(client_settings(**changes), transport=transport) as kie:
        yield kie, recorder


async def test_market_body_nests_input() -> None:
    async with open_fake_kie() as (kie, fake):
        task_id = await kie.create_task(
            Family.MARKET,
            model="google/nano-banana",
            input={"prompt": "cat", "image_size": "1:1"},
            callback_url=HOOK,
        )
        assert task_id == "t-1"
        await kie.create_task(
            Family.MARKET, model="google/nano-banana", input={"prompt": "cat"}, callback_url=None
        )
    first, second = fake.requests
    assert first.method == "POST"
    assert str(first.url) == f"{API}/api/v1/jobs/createTask"
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["accept"] == "application/json"
    assert first.headers["user-agent"].startswith("kied/")
    assert json.loads(first.content) == {
        "model": "google/nano-banana",
        "callBackUrl": HOOK,
        "input": {"prompt": "cat", "image_size": "1:1"},
    }
    assert json.loads(second.content) == {"model": "google/nano-banana", "input": {"prompt": "cat"}}


async def test_other_families_send_input_flat() -> None:
    async with open_fake_kie() as (kie, fake):
        await kie.create_task(
            Family.VEO,
            model="veo3_fast",
            input={"prompt": "x", "aspectRatio": "9:16", "callBackUrl": "http://elsewhere/"},
            callback_url=HOOK,
        )
        await kie.create_task(
            Family.RUNWAY,
            model=None,
            input={"prompt": "x", "callBackUrl": "http://elsewhere/"},
            callback_url=None,
        )
    veo, runway = (json.loads(r.content) for r in fake.requests)
    assert veo == {"prompt": "x", "aspectRatio": "9:16", "model": "veo3_fast", "callBackUrl": HOOK}
    # kied decides where callbacks go: with no callback URL, none is sent at all
    assert runway == {"prompt": "x"}


@pytest.mark.parametrize("family", list(Family), ids=[f.value for f in Family])
async def test_every_family_uses_its_own_endpoints(family: Family) -> None:
    async with open_fake_kie() as (kie, fake):
        await kie.create_task(family, model="m", input={"prompt": "p"}, callback_url=HOOK)
        await kie.get_status(family, TaskId("t-1"))
    create, status = fake.requests
    assert (create.method, create.url.path) == ("POST", SPECS[family].create_path)
    assert (status.method, status.url.path) == ("GET", SPECS[family].status_path)
    assert status.url.params["taskId"] == "t-1"
    assert status.headers["authorization"] == f"Bearer {KEY}"


async def test_without_a_key_no_authorization_is_sent() -> None:
    async with open_fake_kie(api_key=None) as (kie, fake):
        await kie.get_status(Family.MARKET, TaskId("t-1"))
    assert "authorization" not in fake.requests[0].headers


async def test_a_base_url_with_a_path_prefix_is_kept() -> None:
    async with open_fake_kie(base_url="http://gateway.test/kie") as (kie, fake):
        await kie.get_status(Family.VEO, TaskId("a b&c"))
    assert str(fake.requests[0].url) == (
        "http://gateway.test/kie/api/v1/veo/record-info?taskId=a+b%26c"
    )


async def test_a_status_answer_is_read_with_the_familys_map() -> None:
    def veo_done(request: httpx.Request) -> httpx.Response:
        data = {
            "taskId": "veo_1",
            "successFlag": 1,
            "response": {"resultUrls": ["https://cdn.test/v.mp4"]},
        }
        return httpx.Response(200, json={"code": 200, "message": "success", "data": data})

    async with open_fake_kie(veo_done) as (kie, _fake):
        status = await kie.get_status(Family.VEO, TaskId("veo_1"))
    assert status.reading is not None
    assert status.reading.outcome is Outcome.SUCCESS
    assert status.reading.kie_state == "1"
    assert status.reading.result_urls == ("https://cdn.test/v.mp4",)


# ============================================================================================
# Answers: KIE's envelope codes (KIE-API.md §4), HTTP statuses and broken answers


@dataclass(frozen=True)
class Case:
    id: str
    http_status: int
    body: Any  # JSON-able, or bytes sent as they are
    expect: str  # "rejected", "busy", "unknown", "error", "ok"
    code: int | None = None
    message: str | None = None  # expected in str(exc)
    retry_after_s: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    calls: tuple[str, ...] = ("create", "status")

    def response(self, request: httpx.Request) -> httpx.Response:
        headers = dict(self.headers)
        if isinstance(self.body, bytes):
            return httpx.Response(self.http_status, content=self.body, headers=headers)
        return httpx.Response(self.http_status, json=self.body, headers=headers)


def env(code: Any, msg: str = "", data: Any = None, key: str = "msg") -> dict[str, Any]:
    return {"code": code, key: msg, "data": data}


HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>502</body></html>"
CASES = [
    # the account: stop and tell someone
    Case("200+401", 200, env(401, "Unauthorized"), "rejected", 401, "KIE API key rejected"),
    Case("200+402", 200, env(402, "Credits insufficient"), "rejected", 402, "insufficient credits"),
    Case("200+433", 200, env(433, "Sub-key limit"), "rejected", 433, "sub-key over its limit"),
    Case("http401", 401, {"error": "unauthorized"}, "rejected", 401, "KIE API key rejected"),
    Case("http401-text", 401, b"Unauthorized", "rejected", 401, "KIE API key rejected"),
    Case("code-as-text", 200, env("401", "Unauthorized"), "rejected", 401, "KIE API key rejected"),
    Case(
        "message-key",
        200,
        env(402, "Out of credits", key="message"),
        "rejected",
        402,
        "Out of credits",
    ),
    # transient: back off
    Case("200+429", 200, env(429, "Rate Limited"), "busy", 429, "rate limit exceeded"),
    Case("200+405", 200, env(405, "Rate limited"), "busy", 405),
    Case("200+430", 200, env(430, "Too frequent"), "busy", 430),
    Case("200+455", 200, env(455, "Maintenance"), "busy", 455, "maintenance"),
    Case("200+500", 200, env(500, "Server Error"), "busy", 500, "Server Error"),
    Case("200+503", 200, env(503, "Busy"), "busy", 503),
    Case(
        "http429+retry-after",
        429,
        env(429, "Rate Limited"),
        "busy",
        429,
        retry_after_s=7.0,
        headers=(("Retry-After", "7"),),
    ),
    Case(
        "http429-text+retry-after",
        429,
        b"slow down",
        "busy",
        429,
        retry_after_s=12.0,
        headers=(("Retry-After", " 12 "),),
    ),
    Case(
        "http503+retry-after",
        503,
        b"Service Unavailable",
        "busy",
        503,
        retry_after_s=5.0,
        headers=(("Retry-After", "5"), ("Content-Type", "text/plain")),
    ),
    Case(
        "http503+retry-after-date",
        503,
        b"down",
        "busy",
        503,
        headers=(("Retry-After", "Wed, 21 Oct 2026 07:28:00 GMT"),),
    ),
    Case(
        "http503+retry-after-negative",
        503,
        b"down",
        "busy",
        503,
        headers=(("Retry-After", "-5"),),
    ),
    Case("http502-html", 502, HTML_502, "busy", 502, "not JSON"),
    Case("http500+envelope-200", 500, env(200, "success"), "busy", 500),
    Case("200-not-json", 200, b"<html>oops</html>", "busy", 200, "not JSON"),
    Case("200-empty", 200, b"", "busy", 200, "not JSON"),
    Case("200-json-array", 200, [1, 2], "busy", 200, "not JSON"),
    Case("200-not-utf8", 200, b"\xff\xfe{", "busy", 200, "not JSON"),
    Case("200-no-code", 200, {"data": {"taskId": "x"}}, "busy", None, "no envelope code"),
    # refused: do not retry
    Case("200+400", 200, env(400, "Bad prompt"), "rejected", 400, "Bad prompt"),
    Case("200+408", 200, env(408, "Timeout."), "rejected", 408),
    Case("200+413", 200, env(413, "Prompt too long"), "rejected", 413),
    Case("200+451", 200, env(451, "Cannot fetch image"), "rejected", 451),
    Case("200+501", 200, env(501, "Failed"), "rejected", 501, "generation failed"),
    Case("200+505", 200, env(505, "Disabled"), "rejected", 505, "feature disabled"),
    Case("200+531", 200, env(531, "Refunded"), "rejected", 531, "credits refunded"),
    Case(
        "200+422-create",
        200,
        env(422, "The page does not exist or is not published"),
        "rejected",
        422,
        "not published",
        calls=("create",),
    ),
    Case(
        "200+422-status", 200, env(422, "taskId is malformed"), "rejected", 422, calls=("status",)
    ),
    Case("200+no-message", 200, {"code": 400}, "rejected", 400, "no message"),
    Case("http301", 301, b"", "rejected", 301),
    Case("http404-route", 404, env(404, "Not Found"), "rejected", 404, calls=("status",)),
    # KIE does not know the task (yet)
    Case("recordInfo-is-null", 200, env(422, "recordInfo is null"), "unknown", calls=("status",)),
    Case(
        "recordInfo-is-null-create",
        200,
        env(422, "recordInfo is null"),
        "rejected",
        422,
        calls=("create",),
    ),
    Case("veo-record-is-null", 200, env(422, "record is null"), "unknown", calls=("status",)),
    Case(
        "veo-14-days",
        200,
        env(422, "Only supports records within 14 days"),
        "unknown",
        calls=("status",),
    ),
    Case("200+404", 200, env(404, "Not Found"), "unknown", calls=("status",)),
    Case("200+404-create", 200, env(404, "Not Found"), "rejected", 404, calls=("create",)),
    Case("no-data", 200, env(200, "success"), "unknown", calls=("status",)),
    # success, but no task id
    Case("create-no-data", 200, env(200, "success"), "error", None, "taskId", calls=("create",)),
    Case(
        "create-empty-id",
        200,
        env(200, "success", {"taskId": " "}),
        "error",
        None,
        "taskId",
        calls=("create",),
    ),
    Case("create-task_id", 200, env(200, "success", {"task_id": "abc"}), "ok", calls=("create",)),
    Case("create-int-id", 200, env(200, "success", {"taskId": 12345}), "ok", calls=("create",)),
]
RUNS = [(case, call) for case in CASES for call in case.calls]


async def call_kie(kie: KieClient, call: str) -> TaskId | TaskStatus:
    if call == "create":
        return await kie.create_task(
            Family.MARKET, model="m", input={"prompt": "p"}, callback_url=HOOK
        )
    return await kie.get_status(Family.MARKET, TaskId("t-1"))


@pytest.mark.parametrize(("case", "call"), RUNS, ids=[f"{c.id}-{call}" for c, call in RUNS])
async def test_kies_answers_are_mapped(case: Case, call: str) -> None:
    async with open_fake_kie(case.response) as (kie, _fake):
        if case.expect == "unknown":
            assert await call_kie(kie, call) == TaskStatus(reading=None)
            return
        if case.expect == "ok":
            assert await call_kie(kie, call) in ("abc", "12345")
            return
        expected: type[UpstreamError] = {
            "rejected": UpstreamRejectedError,
            "busy": UpstreamBusyError,
            "error": UpstreamError,
        }[case.expect]
        with pytest.raises(UpstreamError) as caught:
            await call_kie(kie, call)
    exc = caught.value
    assert type(exc) is expected
    if case.message is not None:
        assert case.message in str(exc)
    if isinstance(exc, UpstreamRejectedError):
        assert exc.code == case.code
        assert exc.message
    if isinstance(exc, UpstreamBusyError):
        assert exc.code == case.code
        assert exc.retry_after_s == case.retry_after_s
    assert KEY not in str(exc)


async def test_an_oversized_answer_is_not_read() -> None:
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (5 * 1024 * 1024))

    async with open_fake_kie(huge) as (kie, _fake):
        with pytest.raises(UpstreamBusyError, match="longer than"):
            await kie.get_status(Family.MARKET, TaskId("t-1"))


# ============================================================================================
# Network trouble and timeouts


async def test_no_answer_times_out_at_exactly_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    transport = httpx.MockTransport(never)
    with trio.fail_after(600):
        async with open_kie_client(
            client_settings(request_timeout_s=12.5), transport=transport
        ) as kie:
            for call in ("create", "status"):
                t0 = trio.current_time()
                with pytest.raises(UpstreamTimeoutError, match=r"within 12\.5 s") as caught:
                    await call_kie(kie, call)
                assert trio.current_time() - t0 == 12.5
                assert isinstance(caught.value, UpstreamBusyError)
                assert caught.value.retry_after_s is None
                assert isinstance(caught.value.__cause__, trio.TooSlowError)


async def test_a_slow_answer_within_the_timeout_is_fine(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(29.9)
        return accept(request)

    with trio.fail_after(600):
        async with open_kie_client(client_settings(), transport=httpx.MockTransport(slow)) as kie:
            t0 = trio.current_time()
            assert await call_kie(kie, "create") == "t-1"
            assert trio.current_time() - t0 == pytest.approx(29.9)


def raising(
    exc_type: type[httpx.TransportError],
) -> Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "expected"),
    [
        (httpx.ConnectError, UpstreamBusyError),
        (httpx.ReadError, UpstreamBusyError),
        (httpx.RemoteProtocolError, UpstreamBusyError),
        (httpx.ConnectTimeout, UpstreamTimeoutError),
        (httpx.ReadTimeout, UpstreamTimeoutError),
        (httpx.PoolTimeout, UpstreamTimeoutError),
    ],
)
async def test_network_errors_are_transient(
    exc_type: type[httpx.TransportError], expected: type[UpstreamBusyError]
) -> None:
    transport = httpx.MockTransport(raising(exc_type))
    async with open_kie_client(client_settings(), transport=transport) as kie:
        for call in ("create", "status"):
            with pytest.raises(UpstreamBusyError) as caught:
                await call_kie(kie, call)
            assert type(caught.value) is expected
            assert isinstance(caught.value.__cause__, exc_type)
            assert caught.value.code is None
            assert exc_type.__name__ in str(caught.value)


# ============================================================================================
# Rate limits


async def call_times(kie: KieClient, calls: list[str]) -> dict[str, list[float]]:
    """Make every call (``create``, ``status``) at once: when each kind's calls ended,
    sorted, from the start."""
    t0 = trio.current_time()
    done: dict[str, list[float]] = {call: [] for call in calls}

    async def one(call: str) -> None:
        await call_kie(kie, call)
        done[call].append(trio.current_time() - t0)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(one, call)
    return {call: sorted(times) for call, times in done.items()}


async def test_creates_are_limited_to_20_per_10_s(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_kie() as (kie, fake):
        times = await call_times(kie, ["create"] * 25)
    assert times["create"] == [0.0] * 20 + [10.5] * 5  # the default window has a margin
    assert len(fake.requests) == 25


async def test_status_queries_are_limited_separately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_kie() as (kie, _fake):
        times = await call_times(kie, ["status"] * 25 + ["create"] * 5)
    # 10 a second, with a 5 % margin (1.05 s)
    assert times["status"] == pytest.approx([0.0] * 10 + [1.05] * 10 + [2.1] * 5)
    assert times["create"] == [0.0] * 5


async def test_status_queries_keep_the_budget_at_the_moment_they_are_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # KIE's 10 per 1.05 s and kied's budget of 5 per 10 s, kept by one limiter.
    async with open_fake_kie(status_budget=(5, 10.0)) as (kie, _fake):
        times = await call_times(kie, ["status"] * 12)
    assert times["status"] == pytest.approx([0.0] * 5 + [10.0] * 5 + [20.0] * 2)


async def test_limits_are_configurable_and_the_wait_is_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        async with open_fake_kie(create_limit=(1, 60.0), request_timeout_s=5.0) as (kie, _fake):
            t0 = trio.current_time()
            await call_kie(kie, "create")
            await call_kie(kie, "create")  # waits its turn for 60 s, longer than the timeout
            assert trio.current_time() - t0 == 60.0


async def test_waiting_for_the_limiter_is_cancellable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        async with open_fake_kie(status_limit=(1, 100.0)) as (kie, fake):
            t0 = trio.current_time()
            await call_kie(kie, "status")
            with trio.move_on_after(3.0) as scope:
                await call_kie(kie, "status")
            assert scope.cancelled_caught
            assert trio.current_time() - t0 == 3.0
            assert len(fake.requests) == 1


# ============================================================================================
# Settings and secrets


@pytest.mark.parametrize(
    "changes",
    [
        {"base_url": "kie.test"},
        {"base_url": "ftp://kie.test"},
        {"base_url": "http://[::1"},
        {"request_timeout_s": 0.0},
        {"request_timeout_s": math.inf},
        {"create_limit": (0, 10.0)},
        {"status_limit": (10, 0.0)},
        {"status_budget": (0, 10.0)},
        {"status_budget": (80, math.nan)},
    ],
)
def test_settings_refuse_nonsense(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"base_url|request_timeout_s|_limit|_budget"):
        client_settings(**changes)


async def test_the_api_key_is_never_logged_or_shown(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    assert KEY not in repr(client_settings())
    caplog.set_level(logging.DEBUG)
    answers = iter(
        [
            httpx.Response(200, json=env(200, "success", {"taskId": "t-1"})),
            httpx.Response(200, json=env(401, "Unauthorized")),
            httpx.Response(503, content=b"down", headers={"Retry-After": "1"}),
        ]
    )
    messages = []
    with trio.fail_after(600):
        async with open_fake_kie(lambda request: next(answers)) as (kie, _fake):
            await call_kie(kie, "create")
            for _ in range(2):
                with pytest.raises(UpstreamError) as caught:
                    await call_kie(kie, "status")
                messages += [str(caught.value), repr(caught.value)]
    assert caplog.records  # the debug lines were there to look at
    assert all(KEY not in message for message in messages)
    assert KEY not in caplog.text
    assert all(KEY not in str(record.__dict__) for record in caplog.records)
