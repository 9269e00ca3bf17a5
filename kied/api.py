"""The jobs service: what the ``/v1`` API does, without HTTP.

A job is stored before KIE is called, so that a crash cannot lose it; the leader's
poller supervisor then creates the KIE task (or, for a task the application created
itself, starts tracking it) and sees it through to the end.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import trio

from kied.core.families import Family
from kied.core.inputs import json_problem, read_json, text_problem, visible
from kied.core.jobs import (
    TERMINAL_STATES,
    EndedBy,
    EventKind,
    EventType,
    Job,
    JobId,
    JobState,
    NewJob,
    Report,
    TaskId,
)
from kied.core.views import iso, job_view
from kied.settings import TERMINAL_EVENTS
from kied.store import DeliveryState

if TYPE_CHECKING:
    import builtins
    from collections.abc import Awaitable, Callable, Mapping

    from kied.changes import JobChanges
    from kied.core import JsonObject, JsonValue
    from kied.settings import Settings
    from kied.store import Delivery, DeliveryAttempt, Event, JobStore, StoredCallback

__all__ = ["BadRequestError", "JobsService", "callback_url", "job_to_json", "read_body"]

logger = logging.getLogger(__name__)

#: Longest a ``GET /v1/jobs/{id}?wait=`` may hold a request open.
MAX_WAIT_S = 300.0
#: While waiting, storage is re-read this often, in case the change came from elsewhere.
_WAIT_RECHECK_S = 1.0
_MAX_KEY = 200
_MAX_METADATA_FILTERS = 10
_MAX_TIMEOUT_S = 30 * 24 * 3600.0


class BadRequestError(Exception):
    """A request the API cannot take; ``field`` names what is wrong."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


def read_body(data: bytes) -> JsonValue:
    """A request body read as JSON (:func:`kied.core.inputs.read_json`).

    Raises:
        BadRequestError: not JSON, or nested too deeply (``body``).
    """
    try:
        return read_json(data)
    except ValueError as exc:
        raise BadRequestError("body", str(exc)) from None


def _check_text(field: str, text: str) -> None:
    """Text from a path or a query, which kied would look up or store."""
    problem = text_problem(text)
    if problem is not None:
        raise BadRequestError(field, problem)


def job_to_json(job: Job) -> dict[str, Any]:
    """The API's view of a job (:func:`kied.core.views.job_view`)."""
    return job_view(job)


def callback_url(settings: Settings, job_id: JobId, *, redacted: bool = False) -> str | None:
    """The ``callBackUrl`` given to KIE for a job: kied's job id and the callback token ride along.

    ``redacted`` puts ``***`` in place of the token (for storing and showing).
    """
    if settings.public_url is None:
        return None
    params: dict[str, str] = {"job": job_id}
    if settings.callback_token is not None:
        params["token"] = "***" if redacted else settings.callback_token
    return f"{settings.public_url}/callbacks/kie?{urlencode(params)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Submission:
    family: Family
    model: str | None
    task_id: TaskId | None
    request: JsonObject | None
    metadata: JsonObject | None
    idempotency_key: str | None
    timeout_s: float


class JobsService:
    """Create, read, wait on and cancel jobs."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Callable[[], Awaitable[JobStore]],
        now: Callable[[], float],
        changes: JobChanges,
    ) -> None:
        self._settings = settings
        self._store = store
        self._now = now
        self._changes = changes

    async def submit(self, body: object) -> tuple[Job, bool]:
        """Store a job from a ``POST /v1/jobs`` body; ``(job, created)``.

        Raises:
            BadRequestError: the body is not a job request.
        """
        sub = _read_submission(
            body,
            default_timeout_s=self._settings.job_timeout_s,
            can_sign=bool(self._settings.webhook_keys),
        )
        now = self._now()
        new = NewJob(
            id=JobId(uuid.uuid4().hex),
            family=sub.family.value,
            model=sub.model,
            task_id=sub.task_id,
            request=sub.request,
            metadata=sub.metadata,
            idempotency_key=sub.idempotency_key,
            created_at=now,
            deadline_at=now + sub.timeout_s,
        )
        store = await self._store()
        job, created = await store.create_job(new)
        if created:
            logger.info(
                "[GEN] job %s stored: %s %s%s",
                job.id,
                job.family,
                job.model or "",
                f" tracking task {job.task_id}" if sub.task_id else "",
                extra={"action": "job_created", "job_id": job.id},
            )
            # A tracked task whose callback came first: storing the job ended it.
            self._changes.wrote(job, ended=job.state in TERMINAL_STATES)
        return job, created

    async def get(self, job_id: str) -> Job | None:
        _check_text("job_id", job_id)
        store = await self._store()
        return await store.get_job(JobId(job_id))

    async def wait(self, job_id: str, wait_s: float) -> Job | None:
        """The job once it is terminal, or as it stands after ``wait_s``.

        When the daemon begins to stop, it answers at once with the job as it stands.
        """
        _check_text("job_id", job_id)
        store = await self._store()
        deadline = trio.current_time() + min(wait_s, MAX_WAIT_S)
        while True:
            event = self._changes.next_change(JobId(job_id))
            job = await store.get_job(JobId(job_id))
            if (
                job is None
                or job.state in TERMINAL_STATES
                or trio.current_time() >= deadline
                or self._changes.stopping
            ):
                return job
            with trio.move_on_at(min(deadline, trio.current_time() + _WAIT_RECHECK_S)):
                await event.wait()

    async def list(
        self,
        *,
        states: list[str] | None,
        limit: int,
        metadata: Mapping[str, str] | None = None,
    ) -> list[Job]:
        """Jobs, newest first; only those in ``states``, and with ``metadata``, when given.

        Raises:
            BadRequestError: an unknown state, or a metadata key that is empty or too long.
        """
        if states is not None:
            for state in states:
                if state not in JobState.__members__.values():
                    raise BadRequestError("state", f"unknown state {state!r}")
        for key, value in (metadata or {}).items():
            field = f"metadata.{visible(key)}"
            if not key or len(key) > _MAX_KEY:
                raise BadRequestError(field, "a metadata key is 1 to 200 characters")
            _check_text(field, key)
            _check_text(field, value)
        if metadata is not None and len(metadata) > _MAX_METADATA_FILTERS:
            raise BadRequestError("metadata", f"at most {_MAX_METADATA_FILTERS} metadata filters")
        store = await self._store()
        return await store.list_jobs(states=states, metadata=metadata or None, limit=limit)

    async def callbacks(
        self, job_id: str, *, limit: int = 100
    ) -> builtins.list[StoredCallback] | None:
        """The job's callback trail, newest first; None when there is no such job."""
        _check_text("job_id", job_id)
        store = await self._store()
        job = await store.get_job(JobId(job_id))
        if job is None:
            return None
        return await store.list_callbacks(job_id=job.id, limit=limit)

    async def events(self, *, after: int, limit: int) -> builtins.list[Event]:
        """Events after the cursor ``after``, oldest first."""
        store = await self._store()
        return await store.list_events(after=after, limit=limit)

    @property
    def stopping(self) -> bool:
        """The daemon is stopping: long polls and event streams answer now."""
        return self._changes.stopping

    def changed(self) -> trio.Event:
        """An event set at the next job change this process sees (take it before reading)."""
        return self._changes.next_change()

    async def deliveries(
        self, *, state: str | None, event_id: str | None, since: float | None, limit: int
    ) -> builtins.list[tuple[Delivery, builtins.list[DeliveryAttempt]]]:
        """Webhook deliveries, newest first, each with its attempts, oldest first.

        Args:
            state: only deliveries in this state (``pending``, ``delivered``, ``failed``).
            event_id: only the deliveries of this event.
            since: only deliveries created at or after this (epoch seconds).
            limit: at most this many deliveries.

        Raises:
            BadRequestError: an unknown state.
        """
        if state is not None and state not in DeliveryState.__members__.values():
            choices = ", ".join(s.value for s in DeliveryState)
            raise BadRequestError("state", f"unknown state {state!r}: one of {choices}")
        if event_id is not None:
            _check_text("event_id", event_id)
        store = await self._store()
        found = await store.list_deliveries(
            state=None if state is None else DeliveryState(state),
            event_id=event_id,
            since=since,
            limit=limit,
        )
        return [(delivery, await store.list_attempts(delivery.id)) for delivery in found]

    async def redeliver(self, *, event_id: str | None, failed_since: float | None) -> int:
        """Send deliveries again from their first attempt; how many.

        Exactly one of the two: every delivery of ``event_id``, whatever its state, or
        every failed delivery created at or after ``failed_since``. Their endpoints are
        enabled again. The leader's notifier sends them within a second or so, on whichever
        instance leads.

        Raises:
            BadRequestError: neither or both given, or an empty event id.
        """
        if event_id is None and failed_since is None:
            raise BadRequestError("event_id", "give an event_id, or failed_since")
        if event_id is not None and failed_since is not None:
            raise BadRequestError("failed_since", "give an event_id or failed_since, not both")
        if event_id is not None and not event_id.strip():
            raise BadRequestError("event_id", "must be an event id (evt_…)")
        if event_id is not None:
            _check_text("event_id", event_id)
        store = await self._store()
        count = await store.redeliver(event_id=event_id, failed_since=failed_since, now=self._now())
        logger.info(
            "[GEN] webhooks: %d deliveries to send again (%s)",
            count,
            f"event {event_id}"
            if event_id is not None
            else f"failed, made since {iso(failed_since)}",
            extra={"action": "webhook_redeliver", "count": count},
        )
        return count

    async def disabled_endpoints(self) -> dict[str, str]:
        """Webhook endpoints disabled after a 410, with why (until a redelivery)."""
        store = await self._store()
        return await store.disabled_endpoints()

    async def cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Stop tracking a job; ``(job, changed)``. A job that already ended is left as it is."""
        _check_text("job_id", job_id)
        store = await self._store()
        changed = await store.apply(
            JobId(job_id), Report(event=EventKind.CANCEL, source=EndedBy.CANCEL), now=self._now()
        )
        if changed is not None:
            self._changes.wrote(changed, ended=True)
            return changed, True
        return await store.get_job(JobId(job_id)), False


def _read_webhook(body: Mapping[str, object], *, can_sign: bool) -> JsonObject | None:
    """A job's own webhook (``webhook_url``, ``webhook_events``), as kept with its request."""
    url = body.get("webhook_url")
    events = body.get("webhook_events")
    if url is None:
        if events is not None:
            raise BadRequestError("webhook_events", "needs a webhook_url")
        return None
    if not isinstance(url, str) or len(url) > 2000:
        raise BadRequestError("webhook_url", "must be an http:// or https:// URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequestError("webhook_url", "must be an http:// or https:// URL")
    if not can_sign:
        raise BadRequestError(
            "webhook_url", "webhooks are signed: the daemon needs KIED_WEBHOOK_SECRET"
        )
    known = {e.value for e in EventType}
    chosen: list[JsonValue]
    if events is None:
        chosen = list(sorted(TERMINAL_EVENTS))
    elif (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e in known for e in events)
    ):
        raise BadRequestError("webhook_events", f"must be a list of event types: {sorted(known)}")
    else:
        chosen = list(sorted({str(e) for e in events}))
    return {"url": url, "events": chosen}


def _read_submission(
    body: object, *, default_timeout_s: float, can_sign: bool = False
) -> _Submission:
    if not isinstance(body, dict):
        raise BadRequestError("body", "must be a JSON object")
    # Every string is stored (or sent to KIE) somewhere: none may hold what cannot be.
    problem = json_problem(body, at="")
    if problem is not None:
        raise BadRequestError(*problem)
    known = {
        "model",
        "family",
        "input",
        "task_id",
        "timeout_s",
        "idempotency_key",
        "metadata",
        "webhook_url",
        "webhook_events",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequestError(unknown[0], "is not a field of a job request")

    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise BadRequestError("model", "must be a non-empty string")
    family_value = body.get("family")
    if family_value is None:
        if model is None:
            raise BadRequestError("model", "a job needs a model (Market) or a family")
        family = Family.MARKET
    else:
        if not isinstance(family_value, str) or family_value not in Family.__members__.values():
            choices = ", ".join(f.value for f in Family)
            raise BadRequestError("family", f"must be one of {choices}")
        family = Family(family_value)
    if family is Family.MARKET and model is None and body.get("task_id") is None:
        raise BadRequestError("model", "a Market job needs a model")

    task_id = body.get("task_id")
    input_value = body.get("input")
    request: JsonObject | None = None
    if task_id is not None:
        if not isinstance(task_id, str) or not task_id.strip() or len(task_id) > _MAX_KEY:
            raise BadRequestError("task_id", "must be a non-empty string of at most 200 characters")
        if input_value is not None:
            raise BadRequestError("input", "a tracked task (task_id) takes no input")
    else:
        if not isinstance(input_value, dict):
            raise BadRequestError("input", "must be a JSON object with the generation request")
        request = {"input": input_value}

    timeout = body.get("timeout_s", default_timeout_s)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
    ):
        raise BadRequestError("timeout_s", "must be a number of seconds")
    if not 0 < timeout <= _MAX_TIMEOUT_S:
        raise BadRequestError("timeout_s", "must be more than 0 and at most 30 days")

    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > _MAX_KEY):
        raise BadRequestError(
            "idempotency_key", "must be a non-empty string of at most 200 characters"
        )
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequestError("metadata", "must be a JSON object")
    webhook = _read_webhook(body, can_sign=can_sign)
    if webhook is not None:
        request = {**(request or {}), "webhook": webhook}
    return _Submission(
        family=family,
        model=model.strip() if isinstance(model, str) else None,
        task_id=TaskId(task_id.strip()) if isinstance(task_id, str) else None,
        request=request,
        metadata=metadata,
        idempotency_key=key,
        timeout_s=float(timeout),
    )
