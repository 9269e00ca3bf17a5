"""The leader's notifier: job events to the application's endpoints, as signed webhooks.

::

    run_webhooks()                    while ACTIVE, in the leader's nursery
    ├── enqueue: event log → one delivery per event and endpoint (durable, with a cursor)
    └── send:    due deliveries → POST, at most ``webhook_concurrency`` per endpoint

Deliveries follow Standard Webhooks 1.0: ``webhook-id`` (the event's id, the same on every
attempt), ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` HMAC-SHA256 of
``id.timestamp.body`` with each configured key). A 2xx answer delivers; anything else,
a timeout or a network error is tried again on the retry schedule (``Retry-After`` is
honoured on 429 and 503); 410 disables the endpoint; after the last attempt the delivery
is ``failed`` — a dead letter, kept, and sent again on request (``kied redeliver``).

Everything lives in storage: a new leader resumes from the notifier's cursor and the
pending deliveries. An attempt in flight when a leader dies is made again, with the same
``webhook-id``: delivery is at least once.
"""

from __future__ import annotations

import json
import logging
import math
import random
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from kied import __version__
from kied.core.schedule import retry_after_s
from kied.core.views import iso
from kied.core.webhooks import Verdict, retry_delay, safe_url, sign, verdict
from kied.errors import StoreError
from kied.store import DeliveryAttempt, DeliveryState, NewDelivery

if TYPE_CHECKING:
    from collections.abc import Callable

    from kied.changes import JobChanges
    from kied.metrics import Metrics
    from kied.settings import Settings
    from kied.store import Delivery, Event, JobStore

__all__ = ["WebhookNotifier", "delivery_body", "endpoints_for"]

logger = logging.getLogger(__name__)

#: events read from the log at once
_ENQUEUE_BATCH: Final = 500
#: due deliveries read at once
_SEND_BATCH: Final = 200
#: storage is read again at least this often, in case a wake-up was missed
_RECHECK_S: Final = 1.0
#: after storage failed
_STORE_RETRY_S: Final = 2.0


def delivery_body(event: Event) -> str:
    """The JSON body every endpoint gets for ``event``."""
    payload: dict[str, Any] = {
        "type": event.type,
        "timestamp": iso(event.created_at),
        "data": event.job,
        "event": {"id": event.id, "cursor": event.cursor},
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def endpoints_for(event: Event, settings: Settings) -> list[str]:
    """Where ``event`` goes: the configured endpoints that take its type, and the job's own."""
    found = [url for url in settings.webhook_urls if event.type in settings.webhook_events]
    own = event.job.get("webhook")
    if isinstance(own, dict):
        url, types = own.get("url"), own.get("events")
        if isinstance(url, str) and isinstance(types, list) and event.type in types:
            if url not in found:
                found.append(url)
    return found


class WebhookNotifier:
    """Delivers the event log to the endpoints; run it on the leader only."""

    def __init__(
        self,
        *,
        store: JobStore,
        settings: Settings,
        changes: JobChanges,
        metrics: Metrics,
        now: Callable[[], float],
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._changes = changes
        self._metrics = metrics
        self._now = now
        self._transport = transport
        self._rng = rng or random.Random()
        self._queued = trio.Event()
        self._busy: set[int] = set()
        self._per_endpoint: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Enqueue and send until cancelled.

        Cancellation: an attempt cut short is not recorded, and is made again by the next
        leader (same ``webhook-id``).

        Resource handling: owns one ``httpx.AsyncClient``, closed on exit.
        """
        timeout = httpx.Timeout(self._settings.webhook_timeout_s)
        async with (
            httpx.AsyncClient(
                timeout=timeout,
                transport=self._transport,
                trust_env=False,
                follow_redirects=False,
                headers={"User-Agent": f"kied/{__version__}"},
            ) as http,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._enqueue_forever)
            nursery.start_soon(self._send_forever, http, nursery)
            task_status.started()

    async def _enqueue_forever(self) -> None:
        cursor: int | None = None
        while True:
            change = self._changes.next_change()
            try:
                if cursor is None:
                    cursor = await self._store.webhook_cursor()
                events = await self._store.list_events(after=cursor, limit=_ENQUEUE_BATCH)
                if events:
                    disabled = await self._store.disabled_endpoints()
                    deliveries = [
                        NewDelivery(
                            event_id=event.id,
                            event_cursor=event.cursor,
                            job_id=event.job_id,
                            type=event.type,
                            endpoint=endpoint,
                            body=delivery_body(event),
                            created_at=self._now(),
                        )
                        for event in events
                        for endpoint in endpoints_for(event, self._settings)
                        if endpoint not in disabled
                    ]
                    await self._store.enqueue_deliveries(deliveries, cursor=events[-1].cursor)
                    cursor = events[-1].cursor
                    if deliveries:
                        self._queued.set()
                    continue
            except StoreError as exc:
                logger.warning("[GEN] webhooks: cannot read the event log: %s", exc)
                await trio.sleep(_STORE_RETRY_S)
                continue
            with trio.move_on_after(_RECHECK_S):
                await change.wait()

    async def _send_forever(self, http: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        per_endpoint = self._settings.webhook_concurrency
        while True:
            queued = self._queued = trio.Event()
            try:
                due = await self._store.due_deliveries(
                    now=self._now(), limit=_SEND_BATCH, per_endpoint=per_endpoint
                )
                for delivery in due:
                    taken = self._per_endpoint.get(delivery.endpoint, 0)
                    if delivery.id in self._busy or taken >= per_endpoint:
                        continue
                    self._busy.add(delivery.id)
                    self._per_endpoint[delivery.endpoint] = taken + 1
                    nursery.start_soon(self._attempt, http, delivery)
                next_at = await self._store.next_delivery_at()
            except StoreError as exc:
                logger.warning("[GEN] webhooks: cannot read deliveries: %s", exc)
                await trio.sleep(_STORE_RETRY_S)
                continue
            # Until the next one is due, or something is queued, or an attempt ends (which
            # frees a place): at most _RECHECK_S. Something due that could not start now
            # waits for a place, not in a busy loop.
            wait_s = _RECHECK_S if next_at is None else next_at - self._now()
            with trio.move_on_after(wait_s if 0 < wait_s < _RECHECK_S else _RECHECK_S):
                await queued.wait()

    async def _attempt(self, http: httpx.AsyncClient, delivery: Delivery) -> None:
        try:
            await self._attempt_once(http, delivery)
        finally:
            self._busy.discard(delivery.id)
            self._per_endpoint[delivery.endpoint] -= 1
            if not self._per_endpoint[delivery.endpoint]:
                del self._per_endpoint[delivery.endpoint]
            self._queued.set()

    async def _attempt_once(self, http: httpx.AsyncClient, delivery: Delivery) -> None:
        settings = self._settings
        attempted_at = self._now()
        timestamp = math.floor(attempted_at)
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(settings.webhook_keys, delivery.event_id, timestamp, body),
        }
        started = trio.current_time()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            with trio.fail_after(settings.webhook_timeout_s):
                async with http.stream(
                    "POST", delivery.endpoint, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    if status in (429, 503):
                        retry_after = retry_after_s(response.headers.get("retry-after"))
        except trio.TooSlowError:
            error = f"no answer within {settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        duration = trio.current_time() - started
        outcome = Verdict.RETRY if status is None else verdict(status)
        if status is not None and outcome is not Verdict.DELIVERED:
            error = f"HTTP {status}"
        next_at: float | None = None
        if outcome is Verdict.DELIVERED:
            state = DeliveryState.DELIVERED
        elif outcome is Verdict.GONE:
            state = DeliveryState.FAILED
        else:
            delay = retry_delay(
                delivery.attempts + 1,
                settings.webhook_schedule_s,
                jitter=self._rng.random(),
                retry_after_s=retry_after,
            )
            state = DeliveryState.FAILED if delay is None else DeliveryState.PENDING
            next_at = None if delay is None else self._now() + delay
        attempt = DeliveryAttempt(
            delivery_id=delivery.id,
            attempted_at=attempted_at,
            status_code=status,
            duration_s=duration,
            error=error,
        )
        with trio.move_on_after(settings.cleanup_s, shield=True):
            try:
                await self._store.record_attempt(attempt, state=state, next_attempt_at=next_at)
                if outcome is Verdict.GONE:
                    await self._store.disable_endpoint(
                        delivery.endpoint, reason="the endpoint answered 410 Gone", now=self._now()
                    )
            except StoreError as exc:
                logger.warning("[GEN] webhooks: cannot record an attempt: %s", exc)
        result = {
            Verdict.DELIVERED: "delivered",
            Verdict.GONE: "gone",
            Verdict.RETRY: "retry" if state is DeliveryState.PENDING else "failed",
        }[outcome]
        self._metrics.webhook_attempt(result)
        if outcome is Verdict.DELIVERED:
            logger.debug(
                "[GEN] webhook %s %s -> %s in %.0f ms",
                delivery.event_id,
                safe_url(delivery.endpoint),
                status,
                duration * 1000,
            )
        else:
            logger.warning(
                "[GEN] webhook %s (%s) to %s: %s; %s",
                delivery.event_id,
                delivery.type,
                safe_url(delivery.endpoint),
                error,
                {
                    "failed": "out of attempts: kept as failed (kied redeliver sends it again)",
                    "gone": "endpoint disabled until a redelivery",
                    "retry": f"attempt {delivery.attempts + 2} in"
                    f" {0 if next_at is None else next_at - self._now():.0f} s",
                }[result],
                extra={
                    "action": "webhook_failed",
                    "event_id": delivery.event_id,
                    "job_id": delivery.job_id,
                },
            )
