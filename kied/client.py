"""A Python client for a kied daemon's ``/v1`` API, sync and async.

:class:`Client` is for plain Python, :class:`AsyncClient` for asyncio (most bot frameworks)
and trio alike. Both answer with typed, frozen results (:class:`Job`, :class:`Event`,
:class:`CallbackRecord`, :class:`DeliveryRecord`) and raise :class:`KiedClientError` subclasses that carry the API's
own words::

    from kied.client import Client

    with Client("http://127.0.0.1:8080", token="KIED_API_TOKEN") as kied:
        job = kied.submit(
            "google/nano-banana",
            {"prompt": "a red bicycle"},
            idempotency_key="order-17",
            metadata={"chat_id": "42"},
        )
        job = kied.wait(job.id, timeout=900)  # long-polls until the job ends
        if job.state == "succeeded":
            print(job.result_urls)

Or, instead of waiting on each job, follow every job's changes from one place, resuming
from the last cursor the application stored::

    from kied.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:8080", token="KIED_API_TOKEN") as kied:
        async for event in kied.events(after=saved_cursor):
            if event.type == "job.succeeded":
                await deliver(event.job.metadata["chat_id"], event.job.result_urls)
            saved_cursor = event.cursor

The iterator never ends by itself: it long-polls ``GET /v1/events``, and after a network
failure or a server error it reconnects with a capped back-off, carrying on after the last
event it yielded, so every event comes once and in order.

When the daemon sends webhooks, ``deliveries()`` shows what became of them and
``redeliver()`` sends them again::

    failed = kied.deliveries(state="failed")
    kied.redeliver(failed_since=datetime.now(UTC) - timedelta(hours=2))

Requests that are safe to repeat (reads, cancels, and a submit with an
``idempotency_key``) are retried after a network failure; a submit without a key is retried
only when it surely never reached the daemon.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar
from urllib.parse import quote

import anyio
import httpx

from kied._apierror import error_line

if TYPE_CHECKING:
    import builtins
    from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence

__all__ = [
    "AsyncClient",
    "BadRequestError",
    "CallbackRecord",
    "Client",
    "DeliveryAttemptRecord",
    "DeliveryRecord",
    "Event",
    "EventPage",
    "Job",
    "JobError",
    "KiedClientError",
    "NotFoundError",
    "ServerError",
    "Submission",
    "UnauthorizedError",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Longest the daemon holds one long poll (``kied.api.MAX_WAIT_S``); longer waits take rounds.
_MAX_WAIT_S: Final = 300.0
_DEFAULT_TIMEOUT_S: Final = 10.0
_DEFAULT_RETRIES: Final = 2
_RETRY_FIRST_S: Final = 0.5
_RETRY_MAX_S: Final = 5.0
#: ``events()`` reconnects after this at first, doubling up to the cap.
_RECONNECT_FIRST_S: Final = 0.5
_RECONNECT_MAX_S: Final = 10.0
# A proxy in front of the daemon answers these while it restarts; worth asking again.
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
# Failures that mean the request never left: safe to send again whatever it was.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


# ============================================================================================
# Errors


class KiedClientError(Exception):
    """The daemon refused a request, failed, or could not be reached.

    ``str()`` is the API's ``error``/``detail`` on one line, e.g.
    ``input: must be a JSON object (HTTP 400 invalid request)``.

    Attributes:
        status: the HTTP status, or ``None`` when no answer came.
        error: the API's ``error`` (``"invalid request"``, ``"not found"``, ...), if any.
        detail: the API's ``detail``, if any.
        body: the answer's JSON, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        detail: str | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.detail = detail
        self.body = body


class BadRequestError(KiedClientError):
    """400: the request is not one the API takes; ``field`` names what is wrong."""

    def __init__(self, message: str, *, field: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.field = field


class UnauthorizedError(KiedClientError):
    """401: the daemon wants its API token (``token=``), or another one."""


class NotFoundError(KiedClientError):
    """404: no such job."""


class ServerError(KiedClientError):
    """A 5xx answer, an answer that is not kied's, or no answer after the retries.

    ``status`` is ``None`` when the daemon could not be reached at all.
    """


# ============================================================================================
# Results


@dataclass(frozen=True, slots=True)
class JobError:
    """Why a job failed or timed out: KIE's code and message, or kied's own."""

    code: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Submission:
    """How often kied sent createTask for a job, and whether one is still unanswered."""

    count: int
    last_sent_at: datetime | None
    in_flight: bool
    callback_url: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A job as the daemon showed it. Times are UTC-aware; ``raw`` is the whole JSON."""

    id: str
    state: str  # submitting, pending, succeeded, failed, timed_out, cancelled
    terminal: bool
    family: str | None
    model: str | None
    task_id: str | None
    kie_state: str | None
    result_urls: tuple[str, ...]
    error: JobError | None
    ended_by: str | None  # callback, callback_confirmed, poll, submit, deadline, cancel
    late: bool
    created_at: datetime | None
    updated_at: datetime | None
    #: when the job times out: its timeout from kied's first createTask (provisional, from its
    #: creation, while it waits in kied's createTask queue)
    deadline_at: datetime | None
    ended_at: datetime | None
    last_error: str | None
    metadata: dict[str, Any] | None = field(hash=False)
    idempotency_key: str | None
    submission: Submission | None
    other_task_ids: tuple[str, ...]
    raw: dict[str, Any] = field(hash=False, repr=False)

    @classmethod
    def from_json(cls, data: object) -> Job:
        """A job from the API's JSON; fields it does not know are kept in ``raw`` only.

        Raises:
            ValueError: ``data`` is not a job (no ``id`` or ``state``).
        """
        if not isinstance(data, dict):
            raise ValueError("a job is a JSON object")
        job_id, state = data.get("id"), data.get("state")
        if not isinstance(job_id, str) or not isinstance(state, str):
            raise ValueError("a job has an id and a state")
        error = data.get("error")
        submission = data.get("submission")
        metadata = data.get("metadata")
        return cls(
            id=job_id,
            state=state,
            terminal=data.get("terminal") is True,
            family=_str(data.get("family")),
            model=_str(data.get("model")),
            task_id=_str(data.get("task_id")),
            kie_state=_str(data.get("kie_state")),
            result_urls=_strings(data.get("result_urls")),
            error=(
                JobError(code=_str(error.get("code")), message=_str(error.get("message")))
                if isinstance(error, dict)
                else None
            ),
            ended_by=_str(data.get("ended_by")),
            late=data.get("late") is True,
            created_at=_time(data.get("created_at")),
            updated_at=_time(data.get("updated_at")),
            deadline_at=_time(data.get("deadline_at")),
            ended_at=_time(data.get("ended_at")),
            last_error=_str(data.get("last_error")),
            metadata=metadata if isinstance(metadata, dict) else None,
            idempotency_key=_str(data.get("idempotency_key")),
            submission=(
                Submission(
                    count=_int(submission.get("count")),
                    last_sent_at=_time(submission.get("last_sent_at")),
                    in_flight=submission.get("in_flight") is True,
                    callback_url=_str(submission.get("callback_url")),
                )
                if isinstance(submission, dict)
                else None
            ),
            other_task_ids=_strings(data.get("other_task_ids")),
            raw=data,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One entry of the event log: a job changed, and how it stood then.

    ``cursor`` increases with every event; pass the last one seen as ``after`` to resume.
    """

    cursor: int
    id: str  # "evt_…", stable: the same event always has the same id
    type: str  # "job.succeeded", ...
    created_at: datetime
    job: Job
    raw: dict[str, Any] = field(hash=False, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: object) -> Event:
        """An event from the API's JSON.

        Raises:
            ValueError: ``data`` is not an event.
        """
        if not isinstance(data, dict):
            raise ValueError("an event is a JSON object")
        cursor, event_id, kind = data.get("cursor"), data.get("id"), data.get("type")
        created_at = _time(data.get("created_at"))
        if (
            not isinstance(cursor, int)
            or isinstance(cursor, bool)
            or not isinstance(event_id, str)
            or not isinstance(kind, str)
            or created_at is None
        ):
            raise ValueError("an event has a cursor, an id, a type and a time")
        return cls(
            cursor=cursor,
            id=event_id,
            type=kind,
            created_at=created_at,
            job=Job.from_json(data.get("job")),
            raw=data,
        )


@dataclass(frozen=True, slots=True)
class EventPage:
    """One answer of ``GET /v1/events``: the events, oldest first, and where to go on from."""

    events: tuple[Event, ...]
    next_cursor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackRecord:
    """One callback KIE sent about a job: when, what it said, and what kied made of it."""

    id: int
    received_at: datetime | None
    task_id: str | None
    found_by: str | None  # where the task id was found, e.g. "data.taskId"
    outcome: str | None  # success, fail, pending, unknown
    problem: str | None  # why the body could not be read, if it could not
    authenticated: bool
    auth: str | None  # token, hmac, token+hmac, open, or why it was rejected
    effect: str | None  # changed, no-op, no job, rejected, not applicable, other task, to confirm
    body_size: int
    content_type: str | None
    body: str  # as received, decoded as UTF-8 and cut to 64 KiB
    raw: dict[str, Any] = field(hash=False, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: object) -> CallbackRecord:
        """A callback record from the API's JSON.

        Raises:
            ValueError: ``data`` is not a callback record.
        """
        if not isinstance(data, dict) or not isinstance(data.get("id"), int):
            raise ValueError("a callback record is a JSON object with an id")
        return cls(
            id=data["id"],
            received_at=_time(data.get("received_at")),
            task_id=_str(data.get("task_id")),
            found_by=_str(data.get("found_by")),
            outcome=_str(data.get("outcome")),
            problem=_str(data.get("problem")),
            authenticated=data.get("authenticated") is True,
            auth=_str(data.get("auth")),
            effect=_str(data.get("effect")),
            body_size=_int(data.get("body_size")),
            content_type=_str(data.get("content_type")),
            body=_str(data.get("body")) or "",
            raw=data,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryAttemptRecord:
    """One try at a webhook delivery: what the endpoint answered, or why there was no answer."""

    attempted_at: datetime | None
    status_code: int | None  # None: no answer (see error)
    duration_ms: float
    error: str | None  # "HTTP 500", a network error, "no answer within 15 s", ...

    @classmethod
    def from_json(cls, data: object) -> DeliveryAttemptRecord:
        """An attempt from the API's JSON.

        Raises:
            ValueError: ``data`` is not an attempt.
        """
        if not isinstance(data, dict):
            raise ValueError("a delivery attempt is a JSON object")
        duration = data.get("duration_ms")
        return cls(
            attempted_at=_time(data.get("attempted_at")),
            status_code=_optional_int(data.get("status_code")),
            duration_ms=(
                float(duration)
                if isinstance(duration, int | float) and not isinstance(duration, bool)
                else 0.0
            ),
            error=_str(data.get("error")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord:
    """One event's webhook delivery to one endpoint, and every attempt at it.

    ``endpoint`` shows the URL's query, which may hold a secret, as ``?…``. ``attempts``
    counts the attempts since it was last queued (a redelivery starts again from 0);
    ``history`` holds every attempt ever made, oldest first.
    """

    id: int
    event_id: str  # "evt_…": the webhook-id the endpoint got
    type: str  # "job.succeeded", ...
    job_id: str | None
    endpoint: str
    state: str  # pending, delivered, failed
    attempts: int
    next_attempt_at: datetime | None  # when pending
    created_at: datetime | None
    updated_at: datetime | None
    delivered_at: datetime | None
    last_status: int | None
    last_error: str | None
    history: tuple[DeliveryAttemptRecord, ...]
    raw: dict[str, Any] = field(hash=False, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: object) -> DeliveryRecord:
        """A delivery from the API's JSON.

        Raises:
            ValueError: ``data`` is not a delivery.
        """
        if not isinstance(data, dict):
            raise ValueError("a delivery is a JSON object")
        delivery_id, event_id = data.get("id"), data.get("event_id")
        kind, endpoint, state = data.get("type"), data.get("endpoint"), data.get("state")
        if (
            not isinstance(delivery_id, int)
            or isinstance(delivery_id, bool)
            or not isinstance(event_id, str)
            or not isinstance(kind, str)
            or not isinstance(endpoint, str)
            or not isinstance(state, str)
        ):
            raise ValueError("a delivery has an id, an event id, a type, an endpoint and a state")
        history = data.get("history")
        return cls(
            id=delivery_id,
            event_id=event_id,
            type=kind,
            job_id=_str(data.get("job_id")),
            endpoint=endpoint,
            state=state,
            attempts=_int(data.get("attempts")),
            next_attempt_at=_time(data.get("next_attempt_at")),
            created_at=_time(data.get("created_at")),
            updated_at=_time(data.get("updated_at")),
            delivered_at=_time(data.get("delivered_at")),
            last_status=_optional_int(data.get("last_status")),
            last_error=_str(data.get("last_error")),
            history=tuple(
                DeliveryAttemptRecord.from_json(a)
                for a in (history if isinstance(history, list) else ())
            ),
            raw=data,
        )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str))


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# ============================================================================================
# Requests, shared by both clients: what to send, and what the answer means


@dataclass(frozen=True, slots=True, kw_only=True)
class _Call:
    method: str
    path: str
    params: httpx.QueryParams | None = None
    body: Any = None
    #: how long the daemon may hold the request (a long poll), on top of the read timeout
    hold_s: float = 0.0
    #: sending it twice does no harm, so a failure after it was sent may be retried
    repeatable: bool = True
    #: answers that are not errors for this call, beside 2xx
    accept: frozenset[int] = frozenset()


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _submit_call(
    model: str | None,
    input: Mapping[str, Any] | None,
    *,
    family: str | None,
    task_id: str | None,
    timeout_s: float | None,
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
) -> _Call:
    body: dict[str, Any] = {}
    for key, value in (
        ("model", model),
        ("family", family),
        ("task_id", task_id),
        ("timeout_s", timeout_s),
        ("idempotency_key", idempotency_key),
    ):
        if value is not None:
            body[key] = value
    if input is not None:
        body["input"] = dict(input)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    # The same key returns the same job, so only a keyed submit is safe to send twice.
    return _Call(method="POST", path="/v1/jobs", body=body, repeatable=idempotency_key is not None)


def _wait_call(job_id: str, wait_s: float) -> _Call:
    wait_s = round(max(0.0, min(wait_s, _MAX_WAIT_S)), 3)
    return _Call(
        method="GET",
        path=_job_path(job_id),
        params=httpx.QueryParams({"wait": f"{wait_s:g}"}),
        hold_s=wait_s,
    )


def _cancel_call(job_id: str) -> _Call:
    return _Call(method="DELETE", path=_job_path(job_id), accept=frozenset({409}))


def _list_call(
    state: str | Sequence[str] | None,
    metadata: Mapping[str, str | int | float | bool] | None,
    limit: int,
) -> _Call:
    states = [state] if isinstance(state, str) else list(state or ())
    params = httpx.QueryParams({"state": states, "limit": limit})
    for key, value in (metadata or {}).items():
        # The daemon matches a number or boolean by its JSON text: 42, true.
        params = params.add(
            f"metadata.{key}", value if isinstance(value, str) else json.dumps(value)
        )
    return _Call(method="GET", path="/v1/jobs", params=params)


def _callbacks_call(job_id: str, limit: int) -> _Call:
    return _Call(
        method="GET",
        path=f"{_job_path(job_id)}/callbacks",
        params=httpx.QueryParams({"limit": limit}),
    )


def _events_call(after: int, limit: int, wait: float) -> _Call:
    return _Call(
        method="GET",
        path="/v1/events",
        params=httpx.QueryParams({"after": after, "limit": limit, "wait": f"{wait:g}"}),
        hold_s=wait,
    )


def _instant(value: datetime | float | str) -> float | str:
    # A datetime that names no zone is UTC, as the daemon takes an ISO time without one.
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
    return value


def _deliveries_call(
    state: str | None, event_id: str | None, since: datetime | float | str | None, limit: int
) -> _Call:
    params = httpx.QueryParams({"limit": limit})
    for key, value in (("state", state), ("event_id", event_id)):
        if value is not None:
            params = params.set(key, value)
    if since is not None:
        params = params.set("since", _instant(since))
    return _Call(method="GET", path="/v1/deliveries", params=params)


def _redeliver_call(event_id: str | None, failed_since: datetime | float | str | None) -> _Call:
    body: dict[str, Any] = {}
    if event_id is not None:
        body["event_id"] = event_id
    if failed_since is not None:
        body["failed_since"] = _instant(failed_since)
    # Sent twice, the deliveries would start again twice: retried only when surely unsent.
    return _Call(method="POST", path="/v1/deliveries/redeliver", body=body, repeatable=False)


def _read_timeout(timeout: httpx.Timeout, hold_s: float) -> httpx.Timeout:
    if not hold_s or timeout.read is None:
        return timeout
    return httpx.Timeout(
        connect=timeout.connect, read=timeout.read + hold_s, write=timeout.write, pool=timeout.pool
    )


def _may_retry(call: _Call, exc: Exception) -> bool:
    if isinstance(exc, ServerError):
        return call.repeatable and exc.status in _RETRY_STATUSES
    return call.repeatable or isinstance(exc, _NOT_SENT)


def _unreachable(base_url: httpx.URL, exc: httpx.TransportError) -> ServerError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        reason = f"no answer in time ({reason})"
    return ServerError(f"cannot reach {base_url}: {reason}")


def _answer(call: _Call, response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """The answer's status and JSON object; an error for anything else."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if 200 <= status < 300 or status in call.accept:
        if isinstance(body, dict):
            return status, body
        kind = response.headers.get("content-type", "no content type")
        raise ServerError(
            f"{response.request.url} did not answer like kied (HTTP {status}, {kind})",
            status=status,
        )
    message = error_line(status, body, response.text)
    info = body if isinstance(body, dict) else {}
    kw: dict[str, Any] = {
        "status": status,
        "error": _str(info.get("error")),
        "detail": _str(info.get("detail")),
        "body": body,
    }
    if status == 400:
        raise BadRequestError(message, field=_str(info.get("field")), **kw)
    if status == 401:
        raise UnauthorizedError(message, **kw)
    if status == 404:
        raise NotFoundError(message, **kw)
    if status >= 500:
        raise ServerError(message, **kw)
    raise KiedClientError(message, **kw)


def _parse(parse: Callable[[object], _T], body: object, url: httpx.URL) -> _T:
    try:
        return parse(body)
    except ValueError as exc:
        raise ServerError(f"{url} did not answer like kied: {exc}") from None


def _job_answer(status: int, body: dict[str, Any], url: httpx.URL) -> Job:
    # A 409 on cancel: the job had already ended, and the answer carries it.
    return _parse(Job.from_json, body.get("job") if status == 409 else body, url)


def _jobs_answer(body: dict[str, Any], url: httpx.URL) -> builtins.list[Job]:
    found = body.get("jobs")
    if not isinstance(found, list):
        raise ServerError(f"{url} did not answer like kied: no jobs")
    return [_parse(Job.from_json, j, url) for j in found]


def _callbacks_answer(body: dict[str, Any], url: httpx.URL) -> builtins.list[CallbackRecord]:
    found = body.get("callbacks")
    if not isinstance(found, list):
        raise ServerError(f"{url} did not answer like kied: no callbacks")
    return [_parse(CallbackRecord.from_json, c, url) for c in found]


def _deliveries_answer(body: dict[str, Any], url: httpx.URL) -> builtins.list[DeliveryRecord]:
    found = body.get("deliveries")
    if not isinstance(found, list):
        raise ServerError(f"{url} did not answer like kied: no deliveries")
    return [_parse(DeliveryRecord.from_json, d, url) for d in found]


def _redelivered_answer(body: dict[str, Any], url: httpx.URL) -> int:
    count = body.get("redelivered")
    if not isinstance(count, int) or isinstance(count, bool):
        raise ServerError(f"{url} did not answer like kied: no count of redeliveries")
    return count


def _page_answer(body: dict[str, Any], after: int, url: httpx.URL) -> EventPage:
    found = body.get("events")
    next_cursor = body.get("next_cursor", after)
    if not isinstance(found, list) or not isinstance(next_cursor, int):
        raise ServerError(f"{url} did not answer like kied: no events")
    events = tuple(_parse(Event.from_json, e, url) for e in found)
    return EventPage(events=events, next_cursor=next_cursor)


def _fresh(page: EventPage, cursor: int) -> builtins.list[Event]:
    # Never yield an event twice, or out of order, whatever the answer holds.
    fresh = []
    for event in page.events:
        if event.cursor > cursor:
            fresh.append(event)
            cursor = event.cursor
    return fresh


def _base_url(text: str) -> httpx.URL:
    try:
        url = httpx.URL(text.strip().rstrip("/"))
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {text!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"the daemon's URL must be http:// or https://, not {text!r}")
    return url


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _timeout(timeout: httpx.Timeout | float) -> httpx.Timeout:
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def _backoff(attempt: int, first_s: float, max_s: float) -> float:
    return float(min(max_s, first_s * 2**attempt))


# ============================================================================================
# The sync client


class Client:
    """A sync client for a kied daemon's ``/v1`` API.

    Use it as a context manager, or call :meth:`close` when done. It keeps its connections
    open between requests (an ``httpx.Client``), so make one and keep it.

    Args:
        base_url: the daemon's URL, e.g. ``http://127.0.0.1:8080``.
        token: the daemon's ``KIED_API_TOKEN``, sent as ``Authorization: Bearer``.
        timeout: for every request; a float is seconds for each of connect, read, write
            and pool. Long polls get their wait on top of the read timeout.
        transport: an httpx transport to send through instead of the network (tests).
        retries: how often a failed request that is safe to repeat is sent again.

    Raises:
        ValueError: ``base_url`` is not an ``http://`` or ``https://`` URL.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = _DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        retries: int = _DEFAULT_RETRIES,
    ) -> None:
        self._timeout = _timeout(timeout)
        self._retries = retries
        self._http = httpx.Client(
            base_url=_base_url(base_url),
            headers=_headers(token),
            timeout=self._timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections. The client cannot be used after."""
        self._http.close()

    def submit(
        self,
        model: str | None = None,
        input: Mapping[str, Any] | None = None,
        *,
        family: str | None = None,
        task_id: str | None = None,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Job:
        """Submit a job (``POST /v1/jobs``).

        Args:
            model: the Market model (``google/nano-banana``); not needed with ``family``.
            input: the generation request (for Market, the model's ``input``; for another
                family, that family's request body). None with ``task_id``.
            family: the KIE family (``veo``, ``suno``, ...); Market when omitted.
            task_id: track a task the application created itself instead.
            timeout_s: the job's deadline, seconds from now (the daemon's default if None).
            idempotency_key: submitting the same key again returns the first job.
            metadata: kept with the job for the application (``list(metadata=...)`` finds it).

        Returns:
            The job as stored: usually ``submitting``.

        Raises:
            BadRequestError: the daemon refused the request; ``field`` names what is wrong.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        call = _submit_call(
            model,
            input,
            family=family,
            task_id=task_id,
            timeout_s=timeout_s,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        status, body = self._send(call)
        return _job_answer(status, body, self._http.base_url)

    def get(self, job_id: str) -> Job:
        """The job as it stands (``GET /v1/jobs/{id}``).

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        status, body = self._send(_Call(method="GET", path=_job_path(job_id)))
        return _job_answer(status, body, self._http.base_url)

    def wait(self, job_id: str, timeout: float) -> Job:
        """The job once it has ended, or as it stands when ``timeout`` seconds have passed.

        Long-polls ``GET /v1/jobs/{id}?wait=`` in rounds of at most 300 s.

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        deadline = time.monotonic() + timeout
        while True:
            status, body = self._send(_wait_call(job_id, deadline - time.monotonic()))
            job = _job_answer(status, body, self._http.base_url)
            if job.terminal or time.monotonic() >= deadline:
                return job

    def cancel(self, job_id: str) -> Job:
        """Stop tracking a job (``DELETE /v1/jobs/{id}``); a job that had ended is returned as is.

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        status, body = self._send(_cancel_call(job_id))
        return _job_answer(status, body, self._http.base_url)

    def list(
        self,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str | int | float | bool] | None = None,
        limit: int = 100,
    ) -> builtins.list[Job]:
        """Jobs, newest first (``GET /v1/jobs``).

        Args:
            state: only jobs in this state, or in any of these.
            metadata: only jobs whose metadata has every one of these keys with that value
                (a number or boolean matches by its JSON text: ``42``, ``true``).
            limit: at most this many (1 to 1000).

        Raises:
            BadRequestError: an unknown state, a bad key or limit.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        _, body = self._send(_list_call(state, metadata, limit))
        return _jobs_answer(body, self._http.base_url)

    def callbacks(self, job_id: str, *, limit: int = 100) -> builtins.list[CallbackRecord]:
        """The job's callback trail, newest first (``GET /v1/jobs/{id}/callbacks``).

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        _, body = self._send(_callbacks_call(job_id, limit))
        return _callbacks_answer(body, self._http.base_url)

    def deliveries(
        self,
        state: str | None = None,
        event_id: str | None = None,
        since: datetime | float | str | None = None,
        limit: int = 100,
    ) -> builtins.list[DeliveryRecord]:
        """Webhook deliveries, newest first, with their attempts (``GET /v1/deliveries``).

        Args:
            state: only those ``pending``, ``delivered`` or ``failed``.
            event_id: only the deliveries of this event (``evt_…``).
            since: only those made at or after this: a datetime (UTC when naive), epoch
                seconds, or an ISO 8601 string.
            limit: at most this many (1 to 1000).

        Raises:
            BadRequestError: an unknown state, a bad time or limit.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        _, body = self._send(_deliveries_call(state, event_id, since, limit))
        return _deliveries_answer(body, self._http.base_url)

    def redeliver(
        self, event_id: str | None = None, failed_since: datetime | float | str | None = None
    ) -> int:
        """Send webhook deliveries again from their first attempt; how many
        (``POST /v1/deliveries/redeliver``). Their endpoints are enabled again.

        Args:
            event_id: every delivery of this event, whatever became of it.
            failed_since: or every failed delivery made at or after this: a datetime (UTC
                when naive), epoch seconds, or an ISO 8601 string. Give exactly one.

        Raises:
            BadRequestError: neither or both given, or a bad time; ``field`` names it.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        _, body = self._send(_redeliver_call(event_id, failed_since))
        return _redelivered_answer(body, self._http.base_url)

    def events_page(self, after: int = 0, *, limit: int = 100, wait: float = 0) -> EventPage:
        """One ``GET /v1/events``: the events after cursor ``after``, oldest first.

        Args:
            after: the cursor of the last event already seen (0: from the start).
            limit: at most this many events (1 to 1000).
            wait: when there are none yet, let the daemon wait this long (0 to 300 s).

        Raises:
            BadRequestError: a bad cursor, limit or wait.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.
        """
        _, body = self._send(_events_call(after, limit, wait))
        return _page_answer(body, after, self._http.base_url)

    def events(
        self, after: int = 0, *, wait: float = 30, limit: int = 100
    ) -> Generator[Event, None, None]:
        """Every event after cursor ``after``, in order, for ever: a generator.

        Long-polls ``GET /v1/events``. A network failure or server error is logged and the
        request sent again after a back-off (0.5 s, doubling up to 10 s), from the last
        event yielded; the generator never ends by itself. Store ``event.cursor`` to resume
        after a restart.

        Args:
            after: the cursor of the last event already seen (0: from the start).
            wait: how long each long poll may be held (0 to 300 s).
            limit: at most this many events a request.

        Raises:
            BadRequestError: a bad cursor, limit or wait.
            UnauthorizedError: the token is missing or wrong.
        """
        cursor = after
        failures = 0
        while True:
            try:
                _, body = self._send(_events_call(cursor, limit, wait), retries=0)
                page = _page_answer(body, cursor, self._http.base_url)
            except ServerError as exc:
                delay = _backoff(failures, _RECONNECT_FIRST_S, _RECONNECT_MAX_S)
                failures += 1
                logger.warning("kied events: %s; again in %.1f s", exc, delay)
                time.sleep(delay)
                continue
            failures = 0
            for event in _fresh(page, cursor):
                cursor = event.cursor
                yield event
            cursor = max(cursor, page.next_cursor)

    def _send(self, call: _Call, *, retries: int | None = None) -> tuple[int, dict[str, Any]]:
        retries = self._retries if retries is None else retries
        attempt = 0
        while True:
            failure: Exception
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.body,
                    timeout=_read_timeout(self._timeout, call.hold_s),
                )
                return _answer(call, response)
            except httpx.TransportError as exc:
                if attempt >= retries or not _may_retry(call, exc):
                    raise _unreachable(self._http.base_url, exc) from exc
                failure = exc
            except ServerError as exc:
                if attempt >= retries or not _may_retry(call, exc):
                    raise
                failure = exc
            delay = _backoff(attempt, _RETRY_FIRST_S, _RETRY_MAX_S)
            logger.info("kied %s %s: %s; again in %.1f s", call.method, call.path, failure, delay)
            attempt += 1
            time.sleep(delay)


# ============================================================================================
# The async client


class AsyncClient:
    """An async client for a kied daemon's ``/v1`` API, for asyncio and trio alike.

    Use it as an async context manager, or await :meth:`aclose` when done. One client
    serves any number of tasks at once (it holds an ``httpx.AsyncClient``); open and close
    it in the same event loop that uses it.

    Args:
        base_url: the daemon's URL, e.g. ``http://127.0.0.1:8080``.
        token: the daemon's ``KIED_API_TOKEN``, sent as ``Authorization: Bearer``.
        timeout: for every request; a float is seconds for each of connect, read, write
            and pool. Long polls get their wait on top of the read timeout.
        transport: an httpx async transport to send through instead of the network (tests).
        retries: how often a failed request that is safe to repeat is sent again.

    Raises:
        ValueError: ``base_url`` is not an ``http://`` or ``https://`` URL.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: httpx.Timeout | float = _DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = _DEFAULT_RETRIES,
    ) -> None:
        self._timeout = _timeout(timeout)
        self._retries = retries
        self._http = httpx.AsyncClient(
            base_url=_base_url(base_url),
            headers=_headers(token),
            timeout=self._timeout,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections. The client cannot be used after.

        Cancellation:
            Safe to cancel; the connections are then closed abruptly.

        Resource handling:
            Closes the ``httpx.AsyncClient`` the client opened.
        """
        await self._http.aclose()

    async def submit(
        self,
        model: str | None = None,
        input: Mapping[str, Any] | None = None,
        *,
        family: str | None = None,
        task_id: str | None = None,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Job:
        """Submit a job (``POST /v1/jobs``).

        Args:
            model: the Market model (``google/nano-banana``); not needed with ``family``.
            input: the generation request (for Market, the model's ``input``; for another
                family, that family's request body). None with ``task_id``.
            family: the KIE family (``veo``, ``suno``, ...); Market when omitted.
            task_id: track a task the application created itself instead.
            timeout_s: the job's deadline, seconds from now (the daemon's default if None).
            idempotency_key: submitting the same key again returns the first job.
            metadata: kept with the job for the application (``list(metadata=...)`` finds it).

        Returns:
            The job as stored: usually ``submitting``.

        Raises:
            BadRequestError: the daemon refused the request; ``field`` names what is wrong.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Cancelling after the request was sent may leave the job created unseen: submit
            with an ``idempotency_key`` and submit again to get it.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        call = _submit_call(
            model,
            input,
            family=family,
            task_id=task_id,
            timeout_s=timeout_s,
            idempotency_key=idempotency_key,
            metadata=metadata,
        )
        status, body = await self._send(call)
        return _job_answer(status, body, self._http.base_url)

    async def get(self, job_id: str) -> Job:
        """The job as it stands (``GET /v1/jobs/{id}``).

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Safe to cancel at any point.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        status, body = await self._send(_Call(method="GET", path=_job_path(job_id)))
        return _job_answer(status, body, self._http.base_url)

    async def wait(self, job_id: str, timeout: float) -> Job:  # noqa: ASYNC109
        """The job once it has ended, or as it stands when ``timeout`` seconds have passed.

        Long-polls ``GET /v1/jobs/{id}?wait=`` in rounds of at most 300 s. ``timeout`` is
        what the daemon is asked to wait, so it is a parameter and not a cancel scope: a
        cancel scope would cut the request instead of letting the daemon answer with the
        job as it stands.

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Safe to cancel at any point; the job goes on in the daemon.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        deadline = anyio.current_time() + timeout
        while True:
            status, body = await self._send(_wait_call(job_id, deadline - anyio.current_time()))
            job = _job_answer(status, body, self._http.base_url)
            if job.terminal or anyio.current_time() >= deadline:
                return job

    async def cancel(self, job_id: str) -> Job:
        """Stop tracking a job (``DELETE /v1/jobs/{id}``); a job that had ended is returned as is.

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Cancelling after the request was sent may still cancel the job.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        status, body = await self._send(_cancel_call(job_id))
        return _job_answer(status, body, self._http.base_url)

    async def list(
        self,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str | int | float | bool] | None = None,
        limit: int = 100,
    ) -> builtins.list[Job]:
        """Jobs, newest first (``GET /v1/jobs``).

        Args:
            state: only jobs in this state, or in any of these.
            metadata: only jobs whose metadata has every one of these keys with that value
                (a number or boolean matches by its JSON text: ``42``, ``true``).
            limit: at most this many (1 to 1000).

        Raises:
            BadRequestError: an unknown state, a bad key or limit.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Safe to cancel at any point.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        _, body = await self._send(_list_call(state, metadata, limit))
        return _jobs_answer(body, self._http.base_url)

    async def callbacks(self, job_id: str, *, limit: int = 100) -> builtins.list[CallbackRecord]:
        """The job's callback trail, newest first (``GET /v1/jobs/{id}/callbacks``).

        Raises:
            NotFoundError: no such job.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Safe to cancel at any point.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        _, body = await self._send(_callbacks_call(job_id, limit))
        return _callbacks_answer(body, self._http.base_url)

    async def deliveries(
        self,
        state: str | None = None,
        event_id: str | None = None,
        since: datetime | float | str | None = None,
        limit: int = 100,
    ) -> builtins.list[DeliveryRecord]:
        """Webhook deliveries, newest first, with their attempts (``GET /v1/deliveries``).

        Args:
            state: only those ``pending``, ``delivered`` or ``failed``.
            event_id: only the deliveries of this event (``evt_…``).
            since: only those made at or after this: a datetime (UTC when naive), epoch
                seconds, or an ISO 8601 string.
            limit: at most this many (1 to 1000).

        Raises:
            BadRequestError: an unknown state, a bad time or limit.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Safe to cancel at any point.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        _, body = await self._send(_deliveries_call(state, event_id, since, limit))
        return _deliveries_answer(body, self._http.base_url)

    async def redeliver(
        self, event_id: str | None = None, failed_since: datetime | float | str | None = None
    ) -> int:
        """Send webhook deliveries again from their first attempt; how many
        (``POST /v1/deliveries/redeliver``). Their endpoints are enabled again.

        Args:
            event_id: every delivery of this event, whatever became of it.
            failed_since: or every failed delivery made at or after this: a datetime (UTC
                when naive), epoch seconds, or an ISO 8601 string. Give exactly one.

        Raises:
            BadRequestError: neither or both given, or a bad time; ``field`` names it.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Cancelling after the request was sent may still send the deliveries again.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        _, body = await self._send(_redeliver_call(event_id, failed_since))
        return _redelivered_answer(body, self._http.base_url)

    async def events_page(self, after: int = 0, *, limit: int = 100, wait: float = 0) -> EventPage:
        """One ``GET /v1/events``: the events after cursor ``after``, oldest first.

        Args:
            after: the cursor of the last event already seen (0: from the start).
            limit: at most this many events (1 to 1000).
            wait: when there are none yet, let the daemon wait this long (0 to 300 s).

        Raises:
            BadRequestError: a bad cursor, limit or wait.
            UnauthorizedError: the token is missing or wrong.
            ServerError: the daemon failed or could not be reached.

        Cancellation:
            Safe to cancel at any point.

        Resource handling:
            Uses a pooled connection of the client; nothing is left open.
        """
        _, body = await self._send(_events_call(after, limit, wait))
        return _page_answer(body, after, self._http.base_url)

    async def events(
        self, after: int = 0, *, wait: float = 30, limit: int = 100
    ) -> AsyncGenerator[Event, None]:
        """Every event after cursor ``after``, in order, for ever: an async iterator.

        Long-polls ``GET /v1/events``. A network failure or server error is logged and the
        request sent again after a back-off (0.5 s, doubling up to 10 s), from the last
        event yielded; the iterator never ends by itself. Store ``event.cursor`` to resume
        after a restart.

        Args:
            after: the cursor of the last event already seen (0: from the start).
            wait: how long each long poll may be held (0 to 300 s).
            limit: at most this many events a request.

        Raises:
            BadRequestError: a bad cursor, limit or wait.
            UnauthorizedError: the token is missing or wrong.

        Cancellation:
            Safe to cancel at any point, and to stop iterating (``break``): no event is
            skipped that was not yielded, so resuming from the last cursor seen misses none.

        Resource handling:
            Uses a pooled connection of the client. Close the iterator (``aclose()``, or
            leave the ``async for``) before the client.
        """
        cursor = after
        failures = 0
        while True:
            try:
                _, body = await self._send(_events_call(cursor, limit, wait), retries=0)
                page = _page_answer(body, cursor, self._http.base_url)
            except ServerError as exc:
                delay = _backoff(failures, _RECONNECT_FIRST_S, _RECONNECT_MAX_S)
                failures += 1
                logger.warning("kied events: %s; again in %.1f s", exc, delay)
                await anyio.sleep(delay)
                continue
            failures = 0
            for event in _fresh(page, cursor):
                cursor = event.cursor
                yield event
            cursor = max(cursor, page.next_cursor)

    async def _send(self, call: _Call, *, retries: int | None = None) -> tuple[int, dict[str, Any]]:
        retries = self._retries if retries is None else retries
        attempt = 0
        while True:
            failure: Exception
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.body,
                    timeout=_read_timeout(self._timeout, call.hold_s),
                )
                return _answer(call, response)
            except httpx.TransportError as exc:
                if attempt >= retries or not _may_retry(call, exc):
                    raise _unreachable(self._http.base_url, exc) from exc
                failure = exc
            except ServerError as exc:
                if attempt >= retries or not _may_retry(call, exc):
                    raise
                failure = exc
            delay = _backoff(attempt, _RETRY_FIRST_S, _RETRY_MAX_S)
            logger.info("kied %s %s: %s; again in %.1f s", call.method, call.path, failure, delay)
            attempt += 1
            await anyio.sleep(delay)
