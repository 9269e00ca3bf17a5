"""The KIE simulator (``kied simulate``).

Most tests run the simulator in-process under the autojump clock: its HTTP app through
``httpx.ASGITransport`` and its callbacks into an ``httpx.MockTransport`` receiver, so that
virtual time is exact and nothing sleeps for real. One test serves it on a real socket, and
one runs ``python -m kied.kie.simulator`` as a process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

from kied.errors import ConfigError
from kied.kie.simulator import (
    Family,
    MalformedKind,
    Simulator,
    SimulatorConfig,
    StatusErrorKind,
    create_app,
    main,
    parse_simulator_args,
    serve_simulator,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine

WALL0 = 1_767_225_600.0
API = "http://kie.test"
HOOK = "http://hooks.test/kie"
AUTH = {"Authorization": "Bearer test-key"}
REPO = Path(__file__).resolve().parents[2]


def wall_clock() -> float:
    """Wall time tied to trio's clock, so stamps and the mock clock agree."""
    return WALL0 + trio.current_time()


@dataclass(frozen=True)
class Callback:
    at: float
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records the callbacks the simulator POSTs, answering with ``answer(n)`` for the n-th."""

    def __init__(self, answer: Callable[[int], int] = lambda n: 200) -> None:
        self.answer = answer
        self.calls: list[Callback] = []
        self._send, self._receive = trio.open_memory_channel[Callback](math.inf)

    async def handle(self, req: httpx.Request) -> httpx.Response:
        call = Callback(trio.current_time(), req.headers, await req.aread())
        self.calls.append(call)
        self._send.send_nowait(call)
        return httpx.Response(self.answer(len(self.calls)), json={"status": "received"})

    async def next(self) -> Callback:
        return await self._receive.receive()

    async def nothing_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self._receive.receive()
            return False
        return True


@asynccontextmanager
async def open_sim(
    config: SimulatorConfig,
    receiver: Receiver
    | Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]
    | None = None,
) -> AsyncIterator[tuple[Simulator, httpx.AsyncClient]]:
    """A running simulator, and a KIE API client that reaches it in memory.

    Callbacks go to ``receiver`` (a :class:`Receiver` or a bare MockTransport handler).
    """
    receiver = receiver or Receiver()
    handler = receiver.handle if isinstance(receiver, Receiver) else receiver
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as hooks:
        sim = Simulator(config, client=hooks, now=wall_clock, base_url=API)
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            # Quart's ASGI types are narrower than httpx's; the app is a plain ASGI callable.
            transport = httpx.ASGITransport(app=create_app(sim))  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url=API, headers=AUTH) as api:
                yield sim, api
            nursery.cancel_scope.cancel()


def config(**changes: Any) -> SimulatorConfig:
    return replace(SimulatorConfig(duration_s=(60.0, 60.0), seed=1), **changes)


async def create_market(api: httpx.AsyncClient, *, hook: str | None = HOOK, **headers: str) -> str:
    body: dict[str, Any] = {"model": "google/nano-banana", "input": {"prompt": "a red bicycle"}}
    if hook is not None:
        body["callBackUrl"] = hook
    r = await api.post("/api/v1/jobs/createTask", json=body, headers=headers)
    assert r.status_code == 200
    envelope = r.json()
    assert envelope["code"] == 200, envelope
    task_id: str = envelope["data"]["taskId"]
    return task_id


async def market_state(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    r = await api.get("/api/v1/jobs/recordInfo", params={"taskId": task_id})
    assert r.status_code == 200
    envelope = r.json()
    assert envelope["code"] == 200, envelope
    data: dict[str, Any] = envelope["data"]
    return data


async def task_stats(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    r = await api.get("/_sim/stats", params={"taskId": task_id})
    assert r.status_code == 200
    stats: dict[str, Any] = r.json()["tasks"][task_id]
    return stats


# ============================================================================================
# Timing, states and callbacks


async def test_market_task_is_pending_at_59_s_and_done_at_60_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)

            seen = {}
            for at in (1, 10, 59):
                await trio.sleep_until(t0 + at)
                seen[at] = await market_state(api, task_id)
            assert [seen[at]["state"] for at in (1, 10, 59)] == ["waiting", "queuing", "generating"]
            assert seen[59]["resultJson"] is None
            assert seen[59]["completeTime"] is None

            await trio.sleep_until(t0 + 60)
            done = await market_state(api, task_id)
            assert done["state"] == "success"
            assert isinstance(done["resultJson"], str)
            assert json.loads(done["resultJson"])["resultUrls"] == [
                f"{API}/_sim/files/{task_id}/0.png"
            ]
            assert done["createTime"] == round((WALL0 + t0) * 1000)
            assert done["completeTime"] == round((WALL0 + t0 + 60) * 1000)
            assert done["costTime"] == 60_000
            assert json.loads(done["param"])["callBackUrl"] == HOOK

            callback = await receiver.next()
            assert callback.at == t0 + 60
            assert callback.headers["content-type"] == "application/json"
            body = callback.json()
            assert body["code"] == 200
            assert body["msg"] == "Playground task completed successfully."
            assert body["data"]["taskId"] == task_id
            assert body["data"]["state"] == "success"
            assert isinstance(body["data"]["resultJson"], str)

            stats = await task_stats(api, task_id)
            assert stats["family"] == "market"
            assert stats["state"] == "success"
            assert stats["kie_state"] == "success"
            assert stats["status_queries"] == 4
            assert stats["callbacks_sent"] == stats["callbacks_delivered"] == 1
            assert stats["completed_at"] == pytest.approx(WALL0 + t0 + 60)
            assert stats["callback_first_sent_at"] == pytest.approx(WALL0 + t0 + 60)
            assert stats["last_status_query_at"] == pytest.approx(WALL0 + t0 + 60)


async def test_callback_comes_at_the_deadline_without_any_status_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(duration_s=(10.0, 10.0)), receiver) as (_, api):
            t0 = trio.current_time()
            first = await create_market(api)
            await trio.sleep(3)
            second = await create_market(api)
            calls = [await receiver.next(), await receiver.next()]
            assert [c.at - t0 for c in calls] == [10, 13]
            assert [c.json()["data"]["taskId"] for c in calls] == [first, second]
            stats = await task_stats(api, first)
            assert stats["status_queries"] == 0


async def test_duration_range_is_drawn_per_task(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        async with open_sim(config(duration_s=(5.0, 50.0))) as (sim, api):
            for _ in range(20):
                await create_market(api)
            durations = [t["duration_s"] for t in sim.stats()["tasks"].values()]
            assert all(5.0 <= d <= 50.0 for d in durations)
            assert len(set(durations)) == 20


async def test_suno_sends_text_first_and_complete_for_one_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(6000):
        async with open_sim(config(), receiver) as (_, api):
            t0 = trio.current_time()
            r = await api.post(
                "/api/v1/generate",
                json={"prompt": "neon rain", "customMode": False, "callBackUrl": HOOK},
            )
            task_id = r.json()["data"]["taskId"]
            statuses = []
            kinds = []
            for _ in range(3):
                callback = await receiver.next()
                body = callback.json()
                assert body["code"] == 200
                assert body["data"]["task_id"] == task_id
                kinds.append((callback.at - t0, body["data"]["callbackType"], body["data"]["data"]))
                r = await api.get("/api/v1/generate/record-info", params={"taskId": task_id})
                statuses.append(r.json()["data"]["status"])
            assert [k[0] for k in kinds] == pytest.approx([20, 40, 60])
            assert [k[1] for k in kinds] == ["text", "first", "complete"]
            assert [len(k[2]) for k in kinds] == [0, 1, 2]
            assert kinds[2][2][0]["audio_url"].endswith("/0.mp3")
            assert statuses == ["TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"]
            r = await api.get("/api/v1/generate/record-info", params={"taskId": task_id})
            tracks = r.json()["data"]["response"]["sunoData"]
            assert [t["audioUrl"] for t in tracks] == [k["audio_url"] for k in kinds[2][2]]
            assert await receiver.nothing_within(600)


async def test_a_task_without_callback_url_gets_no_callback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(6000):
        async with open_sim(config(), receiver) as (_, api):
            task_id = await create_market(api, hook=None)
            assert await receiver.nothing_within(3600)
            assert (await market_state(api, task_id))["state"] == "success"
            assert (await task_stats(api, task_id))["callback_url"] is None


async def test_headers_pin_one_tasks_duration_and_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api, **{"X-Sim-Duration": "5", "X-Sim-Outcome": "fail"})
            callback = await receiver.next()
            assert callback.at - t0 == 5
            assert callback.json()["code"] == 501
            assert (await market_state(api, task_id))["state"] == "fail"
            r = await api.post(
                "/api/v1/jobs/createTask",
                json={"model": "m", "input": {}},
                headers={"X-Sim-Outcome": "maybe"},
            )
            assert r.status_code == 400


# ============================================================================================
# Families: create, status spellings and callback shapes


@dataclass(frozen=True)
class FamilyCase:
    name: str
    create: str
    status: str
    body: dict[str, Any]
    pending: Callable[[dict[str, Any]], Any]
    done: Callable[[dict[str, Any]], Any]
    success: Any
    failure: Callable[[Any], bool]
    callback_task_id: Callable[[dict[str, Any]], Any]
    callback_ok: Callable[[dict[str, Any]], bool]
    callback_failed: Callable[[dict[str, Any]], bool]


FAMILY_CASES = [
    FamilyCase(
        "market",
        "/api/v1/jobs/createTask",
        "/api/v1/jobs/recordInfo",
        {"model": "kling-2.6/text-to-video", "input": {"prompt": "a lighthouse"}},
        pending=lambda d: d["state"],
        done=lambda d: d["state"],
        success="success",
        failure=lambda s: s == "fail",
        callback_task_id=lambda b: b["data"]["taskId"],
        callback_ok=lambda b: json.loads(b["data"]["resultJson"])["resultUrls"] != [],
        callback_failed=lambda b: (
            b["code"] == 501
            and b["data"]["state"] == "fail"
            and b["data"]["resultJson"] is None
            and isinstance(b["data"]["failCode"], str)
        ),
    ),
    FamilyCase(
        "veo",
        "/api/v1/veo/generate",
        "/api/v1/veo/record-info",
        {"prompt": "a fox in snow", "model": "veo3_fast", "aspectRatio": "9:16"},
        pending=lambda d: d["successFlag"],
        done=lambda d: d["successFlag"],
        success=1,
        failure=lambda s: s in (2, 3),
        callback_task_id=lambda b: b["data"]["taskId"],
        callback_ok=lambda b: (
            bool(b["data"]["info"]["resultUrls"]) and bool(b["data"]["info"]["originUrls"])
        ),
        callback_failed=lambda b: b["code"] in (400, 422, 500, 501) and "info" not in b["data"],
    ),
    FamilyCase(
        "runway",
        "/api/v1/runway/generate",
        "/api/v1/runway/record-detail",
        {"prompt": "a cat dancing", "duration": 5, "quality": "720p"},
        pending=lambda d: d["state"],
        done=lambda d: d["state"],
        success="success",
        failure=lambda s: s == "fail",
        callback_task_id=lambda b: b["data"]["task_id"],
        callback_ok=lambda b: b["data"]["video_url"].endswith(".mp4"),
        callback_failed=lambda b: b["code"] in (400, 500) and b["data"]["video_url"] == "",
    ),
    FamilyCase(
        "aleph",
        "/api/v1/aleph/generate",
        "/api/v1/aleph/record-info",
        {"prompt": "an eagle", "videoUrl": "https://inputs.test/v.mp4"},
        pending=lambda d: (d["successFlag"], d["errorCode"]),
        done=lambda d: (d["successFlag"], d["errorCode"] != 0),
        success=(1, False),
        failure=lambda s: s == (0, True),
        callback_task_id=lambda b: b["taskId"],
        callback_ok=lambda b: b["data"]["result_video_url"].endswith(".mp4"),
        callback_failed=lambda b: b["code"] != 200 and b["data"] is None,
    ),
    FamilyCase(
        "suno",
        "/api/v1/generate",
        "/api/v1/generate/record-info",
        {"prompt": "a calm piano", "customMode": False, "instrumental": True, "model": "V4"},
        pending=lambda d: d["status"],
        done=lambda d: d["status"],
        success="SUCCESS",
        failure=lambda s: s in ("GENERATE_AUDIO_FAILED", "SENSITIVE_WORD_ERROR"),
        callback_task_id=lambda b: b["data"]["task_id"],
        callback_ok=lambda b: b["data"]["callbackType"] == "complete",
        callback_failed=lambda b: b["code"] != 200 and b["data"]["callbackType"] == "error",
    ),
    FamilyCase(
        "4o",
        "/api/v1/gpt4o-image/generate",
        "/api/v1/gpt4o-image/record-info",
        {"prompt": "a cat", "size": "1:1"},
        pending=lambda d: (d["status"], d["successFlag"]),
        done=lambda d: (d["status"], d["successFlag"]),
        success=("SUCCESS", 1),
        failure=lambda s: s[1] == 2 and s[0].endswith("_FAILED"),
        callback_task_id=lambda b: b["data"]["taskId"],
        callback_ok=lambda b: bool(b["data"]["info"]["result_urls"]),
        callback_failed=lambda b: b["code"] != 200 and b["data"]["info"] is None,
    ),
    FamilyCase(
        "flux-kontext",
        "/api/v1/flux/kontext/generate",
        "/api/v1/flux/kontext/record-info",
        {"prompt": "a tree", "model": "flux-kontext-pro"},
        pending=lambda d: d["successFlag"],
        done=lambda d: d["successFlag"],
        success=1,
        failure=lambda s: s in (2, 3),
        callback_task_id=lambda b: b["data"]["taskId"],
        callback_ok=lambda b: b["data"]["info"]["resultImageUrl"].endswith(".jpg"),
        callback_failed=lambda b: b["code"] != 200 and b["data"]["info"]["resultImageUrl"] == "",
    ),
    FamilyCase(
        "mj",
        "/api/v1/mj/generate",
        "/api/v1/mj/record-info",
        {"taskType": "mj_txt2img", "prompt": "a greenhouse"},
        pending=lambda d: d["successFlag"],
        done=lambda d: d["successFlag"],
        success=1,
        failure=lambda s: s in (2, 3),
        callback_task_id=lambda b: b["data"]["taskId"],
        callback_ok=lambda b: (
            len(b["data"]["resultUrls"]) == 4
            and all(isinstance(u, str) for u in b["data"]["resultUrls"])
        ),
        callback_failed=lambda b: b["code"] == 500 and b["data"]["resultUrls"] == [],
    ),
    FamilyCase(
        "luma",
        "/api/v1/modify/generate",
        "/api/v1/modify/record-info",
        {"prompt": "make it snow", "videoUrl": "https://inputs.test/v.mp4"},
        pending=lambda d: d["successFlag"],
        done=lambda d: d["successFlag"],
        success=1,
        failure=lambda s: s in (2, 3),
        callback_task_id=lambda b: b["data"]["taskId"],
        callback_ok=lambda b: bool(b["data"]["resultUrls"]),
        callback_failed=lambda b: b["code"] == 500,
    ),
]

PENDING = {
    "market": "waiting",
    "veo": 0,
    "runway": "wait",
    "aleph": (0, 0),
    "suno": "PENDING",
    "4o": ("GENERATING", 0),
    "flux-kontext": 0,
    "mj": 0,
    "luma": 0,
}


@pytest.mark.parametrize("fail", [False, True], ids=["success", "fail"])
@pytest.mark.parametrize("case", FAMILY_CASES, ids=[c.name for c in FAMILY_CASES])
async def test_family_states_and_callbacks(
    autojump_clock: trio.testing.MockClock, case: FamilyCase, fail: bool
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(fail_rate=1.0 if fail else 0.0), receiver) as (_, api):
            r = await api.post(case.create, json={**case.body, "callBackUrl": HOOK})
            assert r.status_code == 200
            assert r.json()["code"] == 200
            task_id = r.json()["data"]["taskId"]

            async def data() -> dict[str, Any]:
                r = await api.get(case.status, params={"taskId": task_id})
                assert r.status_code == 200
                assert r.json()["code"] == 200
                assert r.json()["msg"] == "success"
                result: dict[str, Any] = r.json()["data"]
                assert result["taskId"] == task_id
                return result

            assert case.pending(await data()) == PENDING[case.name]

            callbacks = []
            while True:
                body = (await receiver.next()).json()
                assert case.callback_task_id(body) == task_id
                callbacks.append(body)
                if case.name != "suno" or body["data"]["callbackType"] in ("complete", "error"):
                    break
            final = callbacks[-1]
            done = case.done(await data())
            if fail:
                assert case.failure(done), done
                assert case.callback_failed(final), final
            else:
                assert done == case.success
                assert final["code"] == 200
                assert case.callback_ok(final), final
            stats = await task_stats(api, task_id)
            assert stats["family"] == case.name
            assert stats["state"] == ("fail" if fail else "success")


async def test_result_urls_are_served(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            task_id = await create_market(api)
            body = (await receiver.next()).json()
            url = json.loads(body["data"]["resultJson"])["resultUrls"][0]
            r = await api.get(url)
            assert r.status_code == 200
            assert r.headers["content-type"] == "image/png"
            assert (await api.get(f"/_sim/files/nope/{task_id}.png")).status_code == 404


# ============================================================================================
# KIE's error answers


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}],
    ids=["missing", "empty", "no-token", "basic"],
)
async def test_missing_bearer_token_is_a_401_envelope(headers: dict[str, str]) -> None:
    async with open_sim(config()) as (_, api):
        task_id = await create_market(api)
        api.headers.pop("Authorization")
        r = await api.post(
            "/api/v1/jobs/createTask", json={"model": "m", "input": {}}, headers=headers
        )
        assert r.status_code == 200
        assert r.json()["code"] == 401
        assert r.json()["data"] is None
        r = await api.get("/api/v1/jobs/recordInfo", params={"taskId": task_id}, headers=headers)
        assert r.status_code == 200
        assert r.json()["code"] == 401


async def test_unknown_task_id_is_recordinfo_is_null() -> None:
    async with open_sim(config()) as (_, api):
        market_id = await create_market(api)
        for path, task_id in [
            ("/api/v1/jobs/recordInfo", "no-such-task"),
            ("/api/v1/veo/record-info", "veo_nothing"),
            ("/api/v1/runway/record-detail", market_id),  # another family's id
        ]:
            r = await api.get(path, params={"taskId": task_id})
            assert r.status_code == 200
            assert r.json() == {"code": 422, "msg": "recordInfo is null", "data": None}


async def test_bad_create_requests_are_refused_in_the_envelope() -> None:
    async with open_sim(config()) as (sim, api):
        for body, code in [
            (b"not json", 400),
            (b"[1, 2]", 400),
            (b'{"input": {}}', 422),
            (b'{"model": "m"}', 422),
            (b'{"model": "m", "input": {}, "callBackUrl": "ftp://x/y"}', 422),
            (b'{"model": "m", "input": {}, "callBackUrl": 5}', 422),
        ]:
            r = await api.post("/api/v1/jobs/createTask", content=body)
            assert r.status_code == 200
            assert r.json()["code"] == code, body
        r = await api.get("/api/v1/jobs/recordInfo")
        assert r.json()["code"] == 400
        assert sim.stats()["totals"]["tasks"] == 0


# ============================================================================================
# Faults, at rate 0 and rate 1


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_fail_rate(autojump_clock: trio.testing.MockClock, rate: float) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(fail_rate=rate), receiver) as (sim, api):
            for _ in range(10):
                await create_market(api)
            codes = [(await receiver.next()).json()["code"] for _ in range(10)]
            assert codes == [501 if rate else 200] * 10
            totals = sim.stats()["totals"]
            assert (totals["fail"], totals["success"]) == ((10, 0) if rate else (0, 10))


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_drop_callbacks(autojump_clock: trio.testing.MockClock, rate: float) -> None:
    receiver = Receiver()
    with trio.fail_after(6000):
        async with open_sim(config(drop_callbacks=rate), receiver) as (_, api):
            task_id = await create_market(api)
            await trio.sleep(3600)
            assert len(receiver.calls) == (0 if rate else 1)
            stats = await task_stats(api, task_id)
            assert stats["state"] == "success"
            assert stats["callbacks_sent"] == (0 if rate else 1)
            assert stats["callbacks_dropped"] == (1 if rate else 0)
            assert ("drop" in stats["faults"]) == bool(rate)


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_duplicate_callbacks(autojump_clock: trio.testing.MockClock, rate: float) -> None:
    receiver = Receiver()
    with trio.fail_after(6000):
        async with open_sim(config(duplicate_callbacks=rate), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            await trio.sleep(3600)
            assert [c.at - t0 for c in receiver.calls] == ([60, 60] if rate else [60])
            assert len({c.body for c in receiver.calls}) == 1
            assert (await task_stats(api, task_id))["callbacks_sent"] == (2 if rate else 1)


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_late_callbacks(autojump_clock: trio.testing.MockClock, rate: float) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(late_callbacks=rate, late_delay_s=30.0), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            callback = await receiver.next()
            assert callback.at - t0 == (90 if rate else 60)
            stats = await task_stats(api, task_id)
            assert stats["completed_at"] == pytest.approx(WALL0 + t0 + 60)
            assert stats["callback_first_sent_at"] == pytest.approx(
                WALL0 + t0 + (90 if rate else 60)
            )


async def test_malformed_callbacks_at_rate_0_are_well_formed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(malformed_callbacks=0.0), receiver) as (_, api):
            task_id = await create_market(api)
            callback = await receiver.next()
            assert callback.headers["content-type"] == "application/json"
            assert callback.json()["data"]["taskId"] == task_id


def _not_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return True
    return False


MALFORMED_CHECKS: dict[MalformedKind, Callable[[Callback, str], bool]] = {
    MalformedKind.INVALID_JSON: lambda c, tid: _not_json(c.body) and tid.encode() in c.body,
    MalformedKind.TRUNCATED: lambda c, tid: _not_json(c.body) and c.body.startswith(b'{"code"'),
    MalformedKind.WRONG_CONTENT_TYPE: lambda c, tid: (
        c.headers["content-type"].startswith("text/plain") and c.json()["data"]["taskId"] == tid
    ),
    MalformedKind.STRING_DATA: lambda c, tid: (
        isinstance(c.json()["data"], str) and json.loads(c.json()["data"])["taskId"] == tid
    ),
    MalformedKind.EMPTY: lambda c, tid: c.body == b"",
    MalformedKind.NOT_AN_OBJECT: lambda c, tid: (
        isinstance(c.json(), list) and c.json()[0]["data"]["taskId"] == tid
    ),
}


@pytest.mark.parametrize("kind", list(MalformedKind))
async def test_malformed_callbacks_at_rate_1(
    autojump_clock: trio.testing.MockClock, kind: MalformedKind
) -> None:
    receiver = Receiver()
    cfg = config(malformed_callbacks=1.0, malformed_kinds=(kind,))
    with trio.fail_after(600):
        async with open_sim(cfg, receiver) as (_, api):
            task_id = await create_market(api)
            callback = await receiver.next()
            assert MALFORMED_CHECKS[kind](callback, task_id), callback
            stats = await task_stats(api, task_id)
            assert stats["malformed_kind"] == kind.value
            assert "malformed" in stats["faults"]


async def test_malformed_kinds_are_mixed(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(600):
        async with open_sim(config(malformed_callbacks=1.0)) as (sim, api):
            for _ in range(60):
                await create_market(api)
            kinds = {t["malformed_kind"] for t in sim.stats()["tasks"].values()}
            assert kinds == {k.value for k in MalformedKind}


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_stuck_tasks(autojump_clock: trio.testing.MockClock, rate: float) -> None:
    receiver = Receiver()
    with trio.fail_after(100_000):
        async with open_sim(config(stuck=rate), receiver) as (_, api):
            task_id = await create_market(api)
            await trio.sleep(86_400)
            state = (await market_state(api, task_id))["state"]
            assert state == ("generating" if rate else "success")
            assert len(receiver.calls) == (0 if rate else 1)
            if rate:
                r = await api.post(f"/_sim/tasks/{task_id}/complete")
                assert r.status_code == 200
                assert (await market_state(api, task_id))["state"] == "success"
                assert (await receiver.next()).json()["data"]["taskId"] == task_id


@pytest.mark.parametrize("rate", [0.0, 1.0])
async def test_status_errors(autojump_clock: trio.testing.MockClock, rate: float) -> None:
    with trio.fail_after(600):
        async with open_sim(config(status_errors=rate)) as (_, api):
            task_id = await create_market(api)
            answers = []
            for _ in range(100):
                r = await api.get("/api/v1/jobs/recordInfo", params={"taskId": task_id})
                code = r.json()["code"] if "json" in r.headers["content-type"] else None
                answers.append((r.status_code, code))
            if not rate:
                assert set(answers) == {(200, 200)}
                return
            assert (200, 200) not in answers
            http_level = {s for s, _ in answers if s != 200}
            envelopes = {c for s, c in answers if s == 200}
            assert {429, 500, 502, 503} <= http_level
            assert envelopes == {429, 455, 500}
            stats = await task_stats(api, task_id)
            assert stats["status_queries"] == stats["status_errors"] == 100


async def test_status_error_kinds_can_be_narrowed() -> None:
    cfg = config(status_errors=1.0, status_error_kinds=(StatusErrorKind.ENVELOPE_455,))
    async with open_sim(cfg) as (_, api):
        task_id = await create_market(api)
        r = await api.get("/api/v1/jobs/recordInfo", params={"taskId": task_id})
        assert r.status_code == 200
        assert r.json()["code"] == 455
        assert r.json()["data"] is None


async def test_callbacks_are_signed_with_the_hmac_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = b"webhook-hmac-key"
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(hmac_key=key), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            callback = await receiver.next()
            timestamp = callback.headers["x-webhook-timestamp"]
            assert timestamp == str(int(WALL0 + t0 + 60))
            mac = hmac.new(key, f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
            expected = base64.b64encode(mac).decode()
            assert hmac.compare_digest(expected, callback.headers["x-webhook-signature"])


async def test_unsigned_without_a_key(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            await create_market(api)
            callback = await receiver.next()
            assert "x-webhook-signature" not in callback.headers


# ============================================================================================
# Delivery: retries, give-up, timeouts


async def test_failed_callbacks_are_retried_then_given_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver(answer=lambda n: 500)
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            await trio.sleep(300)
            # 1 attempt + 3 retries, after 2, 4 and 8 s
            assert [c.at - t0 for c in receiver.calls] == [60, 62, 66, 74]
            stats = await task_stats(api, task_id)
            assert stats["callbacks_sent"] == 4
            assert stats["callbacks_delivered"] == 0
            assert stats["callbacks_given_up"] == 1
            # the simulator carries on
            await create_market(api)
            assert len((await api.get("/_sim/stats")).json()["tasks"]) == 2


async def test_a_retry_can_succeed(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver(answer=lambda n: 200 if n == 3 else 503)
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            await trio.sleep(300)
            assert [c.at - t0 for c in receiver.calls] == [60, 62, 66]
            stats = await task_stats(api, task_id)
            assert (stats["callbacks_sent"], stats["callbacks_delivered"]) == (3, 1)
            assert stats["callbacks_given_up"] == 0
            assert stats["callback_first_delivered_at"] == pytest.approx(WALL0 + t0 + 66)


async def test_unreachable_and_slow_receivers_never_crash_the_simulator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []

    async def unreachable(req: httpx.Request) -> httpx.Response:
        attempts.append(trio.current_time())
        if len(attempts) % 2:
            raise httpx.ConnectError("connection refused", request=req)
        await trio.sleep(3600)  # longer than the 15 s KIE allows
        raise AssertionError("not reached")

    with trio.fail_after(6000):
        async with open_sim(config(), unreachable) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            await trio.sleep(600)
            # refused at 60; timed out 62..77; refused at 81; timed out 89..104
            assert [a - t0 for a in attempts] == [60, 62, 81, 89]
            stats = await task_stats(api, task_id)
            assert stats["callbacks_given_up"] == 1
            assert (await market_state(api, task_id))["state"] == "success"


# ============================================================================================
# Control endpoints


async def test_force_complete(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    with trio.fail_after(6000):
        async with open_sim(config(), receiver) as (_, api):
            t0 = trio.current_time()
            ok = await create_market(api)
            bad = await create_market(api)
            r = await api.post(f"/_sim/tasks/{ok}/complete")
            assert r.status_code == 200
            assert r.json()["tasks"][ok]["state"] == "success"
            r = await api.post(f"/_sim/tasks/{bad}/complete", json={"fail": True})
            assert r.json()["tasks"][bad]["state"] == "fail"
            calls = [await receiver.next(), await receiver.next()]
            assert {c.at for c in calls} == {t0}
            assert {c.json()["data"]["taskId"]: c.json()["code"] for c in calls} == {
                ok: 200,
                bad: 501,
            }
            assert (await api.post(f"/_sim/tasks/{ok}/complete")).status_code == 409
            assert (await api.post("/_sim/tasks/nope/complete")).status_code == 404
            bad_body = await api.post(f"/_sim/tasks/{ok}/complete", json={"fail": "yes"})
            assert bad_body.status_code == 400
            assert await receiver.nothing_within(600)


async def test_force_complete_suno_sends_every_stage_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(), receiver) as (_, api):
            r = await api.post("/api/v1/generate", json={"prompt": "x", "callBackUrl": HOOK})
            task_id = r.json()["data"]["taskId"]
            await trio.sleep(30)  # after "text"
            assert (await receiver.next()).json()["data"]["callbackType"] == "text"
            await api.post(f"/_sim/tasks/{task_id}/complete")
            kinds = [(await receiver.next()).json()["data"]["callbackType"] for _ in range(2)]
            assert kinds == ["first", "complete"]


async def test_stats_format() -> None:
    async with open_sim(config()) as (_, api):
        task_id = await create_market(api)
        stats = (await api.get("/_sim/stats")).json()
        assert set(stats) == {"tasks", "totals"}
        entry = stats["tasks"][task_id]
        assert {
            "status_queries",
            "callbacks_sent",
            "state",
            "family",
            "completed_at",
            "callback_first_sent_at",
        } <= set(entry)
        assert entry["completed_at"] is None
        assert entry["callback_first_sent_at"] is None
        assert stats["totals"]["tasks"] == stats["totals"]["pending"] == 1
        assert stats["totals"]["creates_answered"] == 1
        assert entry["create_answered"] is True
        assert (await api.get("/_sim/stats", params={"taskId": "x"})).json()["tasks"] == {}
        assert (await api.get("/healthz")).json() == {"ok": True}
        r = await api.get("/no/such/endpoint")
        assert r.status_code == 404
        assert r.json()["code"] == 404


async def test_the_seed_fixes_every_task_fate(autojump_clock: trio.testing.MockClock) -> None:
    cfg = config(
        seed=42,
        duration_s=(1.0, 100.0),
        fail_rate=0.5,
        drop_callbacks=0.3,
        duplicate_callbacks=0.3,
        late_callbacks=0.3,
        malformed_callbacks=0.3,
        stuck=0.2,
    )

    async def fates(polls: int) -> list[tuple[Any, ...]]:
        async with open_sim(cfg) as (sim, api):
            for _ in range(30):
                task_id = await create_market(api)
                for _ in range(polls):  # polling must not change the fates
                    await api.get("/api/v1/jobs/recordInfo", params={"taskId": task_id})
            await trio.sleep(1000)
            return [
                (t["duration_s"], t["state"], tuple(t["faults"]), t["malformed_kind"])
                for t in sim.stats()["tasks"].values()
            ]

    with trio.fail_after(10_000):
        first, second = await fates(0), await fates(3)
    assert first == second
    assert {f[1] for f in first} == {"success", "fail", "pending"}


async def test_many_tasks_share_one_timer(autojump_clock: trio.testing.MockClock) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(duration_s=(1.0, 30.0)), receiver) as (sim, _):
            for n in range(1000):
                reply = sim.create_task(
                    Family.MARKET,
                    json.dumps({"model": "m", "input": {"n": n}, "callBackUrl": HOOK}).encode(),
                    authorization="Bearer k",
                )
                assert reply.status == 200
            await trio.sleep(31)
            assert len(receiver.calls) == 1000
            assert sim.stats()["totals"]["success"] == 1000


# ============================================================================================
# Create delay: the task at once, its answer late


async def post_timed(
    api: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    answers: dict[str, tuple[float, httpx.Response]],
    name: str,
    **headers: str,
) -> None:
    r = await api.post(path, json=body, headers=headers)
    answers[name] = (trio.current_time(), r)


async def test_create_delay_holds_every_familys_answer_but_not_its_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    names = [case.name for case in FAMILY_CASES]
    answers: dict[str, tuple[float, httpx.Response]] = {}
    with trio.fail_after(600):
        async with open_sim(config(create_delay_s=3.0)) as (_, api):
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for case in FAMILY_CASES:
                    body = {**case.body, "callBackUrl": HOOK}
                    nursery.start_soon(post_timed, api, case.create, body, answers, case.name)
                await trio.sleep(1)
                assert answers == {}
                stats = (await api.get("/_sim/stats")).json()
                assert stats["totals"]["tasks"] == len(FAMILY_CASES)
                assert stats["totals"]["creates_answered"] == 0
                held = {entry["family"]: tid for tid, entry in stats["tasks"].items()}
                assert set(held) == set(names)
                assert not any(e["create_answered"] for e in stats["tasks"].values())
                # Each task can be queried before its id is out; another create, with its
                # own delay of 0, is not held up behind them.
                for case in FAMILY_CASES:
                    r = await api.get(case.status, params={"taskId": held[case.name]})
                    assert r.json()["code"] == 200
                    assert r.json()["data"]["taskId"] == held[case.name]
                await post_timed(
                    api,
                    "/api/v1/jobs/createTask",
                    {"model": "m", "input": {}},
                    answers,
                    "undelayed",
                    **{"X-Sim-Create-Delay": "0"},
                )
                assert answers["undelayed"][0] - t0 == 1
            assert {name: at - t0 for name, (at, _) in answers.items()} == {
                **dict.fromkeys(names, 3),
                "undelayed": 1,
            }
            for name in names:
                assert answers[name][1].json()["data"]["taskId"] == held[name]
            stats = (await api.get("/_sim/stats")).json()
            assert stats["totals"]["tasks"] == stats["totals"]["creates_answered"] == 10
            assert all(e["create_answered"] for e in stats["tasks"].values())


async def test_a_short_tasks_callback_comes_before_its_create_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(create_delay_s=3.0), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api, **{"X-Sim-Duration": "1"})
            assert trio.current_time() - t0 == 3
            assert [c.at - t0 for c in receiver.calls] == [1]
            assert receiver.calls[0].json()["data"]["taskId"] == task_id
            stats = await task_stats(api, task_id)
            assert stats["state"] == "success"
            assert stats["completed_at"] == pytest.approx(WALL0 + t0 + 1)
            assert stats["callbacks_delivered"] == 1
            assert stats["create_answered"] is True


async def test_the_create_delay_header_overrides_the_flag(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        async with open_sim(config(create_delay_s=10.0)) as (sim, api):
            elapsed = []
            for header in ({"X-Sim-Create-Delay": "0.5"}, {"X-Sim-Create-Delay": "0"}, {}):
                t0 = trio.current_time()
                await create_market(api, **header)
                elapsed.append(trio.current_time() - t0)
            assert elapsed == [0.5, 0, 10]
            assert sim.stats()["totals"]["creates_answered"] == 3


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", ""])
async def test_a_bad_create_delay_header_is_a_400_and_creates_nothing(
    autojump_clock: trio.testing.MockClock, value: str
) -> None:
    with trio.fail_after(600):
        async with open_sim(config(create_delay_s=5.0)) as (sim, api):
            t0 = trio.current_time()
            r = await api.post(
                "/api/v1/jobs/createTask",
                json={"model": "m", "input": {}, "callBackUrl": HOOK},
                headers={"X-Sim-Create-Delay": value},
            )
            assert trio.current_time() == t0
            assert r.status_code == 400
            assert r.json() == {"error": "X-Sim-Create-Delay must be seconds >= 0"}
            assert sim.stats()["totals"]["tasks"] == 0


async def test_a_client_that_gives_up_during_the_delay_leaves_the_task_created(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(create_delay_s=30.0, duration_s=(10.0, 10.0)), receiver) as (
            _,
            api,
        ):
            t0 = trio.current_time()
            with trio.move_on_after(5) as gave_up:
                await create_market(api)
            assert gave_up.cancelled_caught
            stats = (await api.get("/_sim/stats")).json()
            assert (stats["totals"]["tasks"], stats["totals"]["creates_answered"]) == (1, 0)
            [(task_id, entry)] = stats["tasks"].items()
            assert entry["callback_url"] == HOOK
            assert entry["create_answered"] is False
            # The task nobody heard of runs, and calls back, all the same.
            callback = await receiver.next()
            assert callback.at - t0 == 10
            assert callback.json()["data"]["taskId"] == task_id
            await trio.sleep(60)  # past the delay: the cut-short answer is never counted
            assert (await task_stats(api, task_id))["create_answered"] is False
            assert (await market_state(api, task_id))["state"] == "success"


# ============================================================================================
# Configuration and the command line


def test_defaults() -> None:
    cfg = parse_simulator_args([])
    assert cfg == SimulatorConfig()
    assert cfg.host == "127.0.0.1"
    assert cfg.late_delay_s == 30.0


def test_every_flag_parses() -> None:
    cfg = parse_simulator_args(
        [
            "--host=::1",
            "--port=0",
            "--duration=2-4.5",
            "--fail-rate=0.1",
            "--drop-callbacks=0.2",
            "--duplicate-callbacks=0.3",
            "--late-callbacks=0.4",
            "--late-delay=12",
            "--malformed-callbacks=1",
            "--malformed-kinds=empty,truncated",
            "--stuck=0",
            "--create-delay=2.5",
            "--status-errors=0.5",
            "--status-error-kinds=http-429,envelope-455",
            "--hmac-key=s3cret",
            "--seed=7",
            "--callback-timeout=3",
            "--callback-retries=0",
            "--callback-retry-delay=0.5",
            "--callback-concurrency=8",
            "--graceful-timeout=1",
            "--log-level=debug",
        ]
    )
    assert cfg.duration_s == (2.0, 4.5)
    assert cfg.create_delay_s == 2.5
    assert cfg.malformed_kinds == (MalformedKind.EMPTY, MalformedKind.TRUNCATED)
    assert cfg.status_error_kinds == (StatusErrorKind.HTTP_429, StatusErrorKind.ENVELOPE_455)
    assert cfg.hmac_key == b"s3cret"
    assert (cfg.seed, cfg.callback_retries, cfg.callback_concurrency) == (7, 0, 8)
    assert parse_simulator_args(["--duration", "7"]).duration_s == (7.0, 7.0)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--fail-rate", "1.5"], "--fail-rate"),
        (["--drop-callbacks", "-0.1"], "--drop-callbacks"),
        (["--duplicate-callbacks", "nan"], "--duplicate-callbacks"),
        (["--late-callbacks", "lots"], "--late-callbacks"),
        (["--malformed-callbacks", "2"], "--malformed-callbacks"),
        (["--stuck", "inf"], "--stuck"),
        (["--status-errors", "1.01"], "--status-errors"),
        (["--duration", "5-3"], "--duration"),
        (["--duration", "-1"], "--duration"),
        (["--duration", "soon"], "--duration"),
        (["--late-delay", "-5"], "--late-delay"),
        (["--create-delay", "-1"], "--create-delay"),
        (["--create-delay", "soon"], "--create-delay"),
        (["--port", "70000"], "--port"),
        (["--port", "http"], "--port"),
        (["--host", ""], "--host"),
        (["--seed", "x"], "--seed"),
        (["--hmac-key", ""], "--hmac-key"),
        (["--callback-timeout", "0"], "--callback-timeout"),
        (["--callback-retries", "-1"], "--callback-retries"),
        (["--callback-concurrency", "0"], "--callback-concurrency"),
        (["--malformed-kinds", "mangled"], "--malformed-kinds"),
        (["--status-error-kinds", ""], "--status-error-kinds"),
        (["--log-level", "loud"], "--log-level"),
        (["--port"], "--port"),
        (["--bogus", "1"], "--bogus"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_simulator_args(argv)
    assert info.value.setting == flag
    assert "\n" not in str(info.value)


def test_config_validates_on_construction() -> None:
    with pytest.raises(ConfigError, match="--duration"):
        SimulatorConfig(duration_s=(3.0, 1.0))
    with pytest.raises(ConfigError, match="--fail-rate"):
        SimulatorConfig(fail_rate=-0.5)
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ConfigError, match="--create-delay: must be a number of seconds >= 0"):
            SimulatorConfig(create_delay_s=bad)
    assert SimulatorConfig().create_delay_s == 0


# ============================================================================================
# For real: a socket, and a process


async def _receiver_app(calls: trio.MemorySendChannel[tuple[str, bytes]]) -> QuartTrio:
    app = QuartTrio("kie-callback-receiver")

    @app.post("/hook")
    async def hook() -> dict[str, str]:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        await calls.send((request.headers.get("Content-Type", ""), body))
        return {"status": "received"}

    return app


async def test_serve_simulator_on_a_real_socket(nursery: trio.Nursery) -> None:
    send, receive = trio.open_memory_channel[tuple[str, bytes]](10)
    hcfg = HypercornConfig()
    hcfg.bind = ["127.0.0.1:0"]
    hcfg.accesslog = None
    hcfg.errorlog = None
    with trio.fail_after(10):
        hook_urls = await nursery.start(partial(serve, await _receiver_app(send), hcfg))
        cfg = SimulatorConfig(host="127.0.0.1", port=0, duration_s=(0.05, 0.05), seed=3)
        url = await nursery.start(partial(serve_simulator, cfg))
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":0")
        async with httpx.AsyncClient(base_url=url, headers=AUTH, trust_env=False) as api:
            task_id = await create_market(api, hook=f"{hook_urls[0]}/hook")
            content_type, body = await receive.receive()
            assert content_type == "application/json"
            callback = json.loads(body)
            assert callback["data"]["taskId"] == task_id
            result_url = json.loads(callback["data"]["resultJson"])["resultUrls"][0]
            assert result_url.startswith(f"{url}/_sim/files/{task_id}/")
            assert (await api.get(result_url)).status_code == 200
            assert (await market_state(api, task_id))["state"] == "success"
            # The receiver has the body before the simulator has the receiver's answer.
            while (stats := await task_stats(api, task_id))["callbacks_delivered"] < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert stats["callbacks_sent"] == 1
            assert stats["status_queries"] == 1
            # (two clocks: trio's for the timer, the wall clock for the stamps)
            assert stats["callback_first_sent_at"] >= stats["completed_at"] - 0.01
    nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_create_delay_on_a_real_socket_a_timed_out_client_leaves_the_task(
    nursery: trio.Nursery,
) -> None:
    cfg = SimulatorConfig(port=0, duration_s=(600.0, 600.0), seed=3, create_delay_s=0.3)
    with trio.fail_after(10):
        url = await nursery.start(partial(serve_simulator, cfg))
        async with httpx.AsyncClient(base_url=url, headers=AUTH, trust_env=False) as api:
            with pytest.raises(httpx.ReadTimeout):
                await api.post(
                    "/api/v1/jobs/createTask", json={"model": "m", "input": {}}, timeout=0.05
                )
            await trio.sleep(0.5)  # past the delay: hypercorn cancelled the request
            totals = (await api.get("/_sim/stats")).json()["totals"]
            assert (totals["tasks"], totals["creates_answered"]) == (1, 0)
            task_id = await create_market(api, hook=None)
            stats = (await api.get("/_sim/stats")).json()
            assert (stats["totals"]["tasks"], stats["totals"]["creates_answered"]) == (2, 1)
            assert stats["tasks"][task_id]["create_answered"] is True
    nursery.cancel_scope.cancel()


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0]


SIMULATE = [sys.executable, "-m", "kied.kie.simulator"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_main_as_a_process_prints_its_url_and_stops_on_a_signal(
    signum: signal.Signals,
) -> None:
    argv = [*SIMULATE, "--port", "0", "--duration", "0.01", "--log-level", "warning"]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = partial(
                trio.run_process,
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=REPO,
            )
            proc: trio.Process = await nursery.start(run)
            assert proc.stdout is not None
            line = (await _read_line(proc.stdout)).decode()
            prefix = "kied simulate listening on "
            assert line.startswith(prefix), line
            url = line.removeprefix(prefix)
            async with httpx.AsyncClient(base_url=url, headers=AUTH, trust_env=False) as api:
                assert (await api.get("/healthz")).status_code == 200
                task_id = await create_market(api, hook=None)
                await trio.sleep(0.05)
                assert (await market_state(api, task_id))["state"] == "success"
            proc.send_signal(signum)
            assert await proc.wait() == 0
            assert proc.stderr is not None
            assert await proc.stderr.receive_some() == b""  # no traceback


@pytest.mark.slow
async def test_main_as_a_process_rejects_a_bad_flag() -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [*SIMULATE, "--port", "0", "--fail-rate", "2"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "kied simulate: --fail-rate: must be a fraction in [0, 1], got 2.0"
    ]
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--wat"], "--wat"), (["--duration", "9-1"], "--duration"), (["--seed"], "--seed")],
)
def test_main_rejects_a_bad_flag_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"kied simulate: {flag}: ")


def test_main_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: kied simulate")
    for flag in (
        "--host",
        "--port",
        "--duration",
        "--fail-rate",
        "--drop-callbacks",
        "--duplicate-callbacks",
        "--late-callbacks",
        "--late-delay",
        "--malformed-callbacks",
        "--malformed-kinds",
        "--stuck",
        "--create-delay",
        "--status-errors",
        "--status-error-kinds",
        "--hmac-key",
        "--seed",
        "--callback-timeout",
        "--callback-retries",
        "--callback-retry-delay",
        "--callback-concurrency",
        "--graceful-timeout",
        "--log-level",
    ):
        assert flag in text
    assert "X-Sim-Create-Delay: SECONDS" in text
