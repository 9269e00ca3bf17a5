"""Signed webhooks, in one process under the autojump clock.

kied's daemon services and its simulator as in ``test_pollers.py``; the application's
endpoints are an in-process receiver (``httpx.MockTransport``) that can be down, slow, or
answer 500, 429 with ``Retry-After`` or 410. Signatures are checked with the reference
``standardwebhooks`` package (its ``sign``: the virtual clock is far from today, which its
``verify`` would refuse as too old; ``test_webhooks_procs.py`` verifies on the real clock).
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
from standardwebhooks import Webhook

from kied.core.jobs import JobState
from kied.store import DeliveryState
from tests.integration.test_pollers import open_stack, sim_config

KEY = b"kied-test-webhook-key-0123456789"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
APP = "http://app.test/hooks"
OTHER = "http://other.test/hooks"


@dataclass
class Receiver:
    """The application's endpoints: what they got, and how they answer."""

    got: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    #: endpoint -> "up", "down", "500", "429", "410", or "slow"
    mode: dict[str, str] = field(default_factory=dict)

    def transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            url = str(request.url)
            mode = self.mode.get(url, "up")
            body = await request.aread()
            if mode == "down":
                raise httpx.ConnectError("connection refused", request=request)
            if mode == "slow":
                await trio.sleep(3600)
            verified = _verify(body, request.headers)
            self.got.append(
                (url, {"body": verified, "headers": dict(request.headers)}, trio.current_time())
            )
            if mode == "500":
                return httpx.Response(500)
            if mode == "429":
                return httpx.Response(429, headers={"Retry-After": "60"})
            if mode == "410":
                return httpx.Response(410)
            return httpx.Response(204)

        return httpx.MockTransport(handle)

    def ids(self, url: str = APP) -> list[str]:
        return [r["headers"]["webhook-id"] for u, r, _ in self.got if u == url]

    def types(self, url: str = APP) -> list[str]:
        return [r["body"]["type"] for u, r, _ in self.got if u == url]


def _verify(body: bytes, headers: httpx.Headers) -> dict[str, Any]:
    msg_id = headers["webhook-id"]
    timestamp = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    expected = Webhook(SECRET).sign(msg_id, timestamp, body)
    assert expected in headers["webhook-signature"].split(" ")
    return dict(json.loads(body))


def webhook_settings(**changes: Any) -> dict[str, Any]:
    return {"webhook_urls": (APP,), "webhook_keys": (KEY,), **changes}


async def test_a_finished_job_is_told_to_the_endpoint_signed(tmp_path, autojump_clock):
    receiver = Receiver()
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **webhook_settings()
    ) as stack:
        job = await stack.submit(metadata={"chat_id": 42})
        done = await stack.wait_terminal(job["id"])
        t0 = trio.current_time()
        await trio.sleep(0.5)
        assert receiver.types() == ["job.succeeded"]
        [(_, request, at)] = receiver.got
        assert at - t0 < 0.1  # at once, not on a timer
        body = request["body"]
        assert body["data"]["id"] == done.id
        assert body["data"]["result_urls"] == list(done.result_urls)
        assert body["data"]["metadata"] == {"chat_id": 42}
        assert body["event"]["id"] == request["headers"]["webhook-id"]
        assert request["headers"]["webhook-id"].startswith("evt_")
        [delivery] = await stack.store.list_deliveries()
        assert (delivery.state, delivery.attempts, delivery.last_status) == (
            DeliveryState.DELIVERED,
            1,
            204,
        )


async def test_a_receiver_down_for_ten_minutes_gets_every_event_later(tmp_path, autojump_clock):
    receiver = Receiver(mode={APP: "down"})
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **webhook_settings()
    ) as stack:
        jobs = [(await stack.submit())["id"] for _ in range(5)]
        for job_id in jobs:
            await stack.wait_terminal(job_id)
        t_end = trio.current_time()
        await trio.sleep(600 - (trio.current_time() - t_end))
        assert receiver.got == []
        receiver.mode[APP] = "up"
        # attempts at 0, 5 s, 5 min, then 30 min: the fourth is delivered
        await trio.sleep(1800)
        assert sorted(receiver.types()) == ["job.succeeded"] * 5
        deliveries = await stack.store.list_deliveries()
        assert {(d.state, d.attempts) for d in deliveries} == {(DeliveryState.DELIVERED, 4)}
        attempts = await stack.store.list_attempts(deliveries[0].id)
        assert [a.status_code for a in attempts] == [None, None, None, 204]
        assert all("ConnectError" in (a.error or "") for a in attempts[:3])
        gaps = [b.attempted_at - a.attempted_at for a, b in itertools.pairwise(attempts)]
        assert gaps[0] == pytest.approx(5, rel=0.11)
        assert gaps[1] == pytest.approx(300, rel=0.11)
        assert gaps[2] == pytest.approx(1800, rel=0.11)


async def test_500_and_429_with_retry_after_are_tried_again(tmp_path, autojump_clock):
    receiver = Receiver(mode={APP: "429"})
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **webhook_settings()
    ) as stack:
        await stack.wait_terminal((await stack.submit())["id"])
        await trio.sleep(1)
        assert len(receiver.got) == 1
        receiver.mode[APP] = "500"
        await trio.sleep(59.5)  # Retry-After: 60 wins over the schedule's 5 s
        assert len(receiver.got) == 2
        assert receiver.got[1][2] - receiver.got[0][2] == pytest.approx(60, abs=0.1)
        receiver.mode[APP] = "up"
        await trio.sleep(400)
        assert len(receiver.got) == 3
        assert len(set(receiver.ids())) == 1  # the same webhook-id on every attempt
        [delivery] = await stack.store.list_deliveries()
        assert (delivery.state, delivery.attempts) == (DeliveryState.DELIVERED, 3)


async def test_410_disables_the_endpoint_until_a_redelivery(tmp_path, autojump_clock):
    receiver = Receiver(mode={APP: "410"})
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **webhook_settings()
    ) as stack:
        await stack.wait_terminal((await stack.submit())["id"])
        await trio.sleep(1)
        assert await stack.store.disabled_endpoints() == {APP: "the endpoint answered 410 Gone"}
        await stack.wait_terminal((await stack.submit())["id"])
        await trio.sleep(3600)
        assert len(receiver.got) == 1  # nothing more is sent to it
        [failed] = await stack.store.list_deliveries(state=DeliveryState.FAILED)
        receiver.mode[APP] = "up"
        assert await stack.store.redeliver(event_id=failed.event_id, now=stack.daemon.now()) == 1
        await trio.sleep(2)
        assert receiver.ids() == [failed.event_id, failed.event_id]
        assert await stack.store.disabled_endpoints() == {}


async def test_out_of_attempts_is_a_dead_letter_that_can_be_sent_again(tmp_path, autojump_clock):
    receiver = Receiver(mode={APP: "500"})
    changes = webhook_settings(webhook_schedule_s=(0.0, 1.0, 2.0))
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **changes
    ) as stack:
        await stack.wait_terminal((await stack.submit())["id"])
        await trio.sleep(10)
        [dead] = await stack.store.list_deliveries()
        assert (dead.state, dead.attempts, dead.last_status) == (DeliveryState.FAILED, 3, 500)
        assert len(receiver.got) == 3
        receiver.mode[APP] = "up"
        assert await stack.store.redeliver(failed_since=0.0, now=stack.daemon.now()) == 1
        await trio.sleep(2)
        [again] = await stack.store.list_deliveries()
        assert (again.state, len(receiver.got)) == (DeliveryState.DELIVERED, 4)


async def test_a_dead_endpoint_never_slows_another(tmp_path, autojump_clock):
    receiver = Receiver(mode={APP: "slow"})
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **webhook_settings()
    ) as stack:
        # 20 jobs tell the slow endpoint; each also tells its own, quick one
        jobs = [(await stack.submit(webhook_url=OTHER))["id"] for _ in range(20)]
        for job_id in jobs:
            done = await stack.wait_terminal(job_id)
            assert done.state is JobState.SUCCEEDED
        await trio.sleep(0.5)
        assert len(receiver.ids(OTHER)) == 20
        # the slow one: 4 attempts at a time, each given up after 15 s
        await trio.sleep(20)
        attempts = [
            a
            for d in await stack.store.list_deliveries(limit=100)
            if d.endpoint == APP
            for a in await stack.store.list_attempts(d.id)
        ]
        # four given up at 15 s; the next four are still waiting for their answers
        assert len(attempts) == 4
        assert all(a.error == "no answer within 15 s" for a in attempts)


async def test_a_new_leader_resends_what_was_in_flight_with_the_same_id(tmp_path, autojump_clock):
    receiver = Receiver(mode={APP: "slow"})
    async with open_stack(
        tmp_path, sim_config(), webhook_transport=receiver.transport(), **webhook_settings()
    ) as stack:
        await stack.wait_terminal((await stack.submit())["id"])
        await trio.sleep(1)  # the attempt is in flight
        stack.step_down()
        receiver.mode[APP] = "up"
        await trio.sleep(1)
        assert receiver.got == []
        stack.lead()
        await trio.sleep(1)
        [delivery] = await stack.store.list_deliveries()
        assert delivery.state is DeliveryState.DELIVERED
        assert receiver.ids() == [delivery.event_id]


async def test_a_jobs_own_webhook_and_its_event_filter(tmp_path, autojump_clock):
    receiver = Receiver()
    async with open_stack(
        tmp_path,
        sim_config(),
        webhook_transport=receiver.transport(),
        webhook_keys=(KEY,),
    ) as stack:
        job = await stack.submit(webhook_url=OTHER, webhook_events=["job.created", "job.succeeded"])
        await stack.wait_terminal(job["id"])
        await trio.sleep(1)
        assert receiver.types(OTHER) == ["job.created", "job.succeeded"]
        assert receiver.types(APP) == []
        assert (await stack.job(job["id"])).request == {
            "input": {"prompt": "a red bicycle"},
            "webhook": {"url": OTHER, "events": ["job.created", "job.succeeded"]},
        }
