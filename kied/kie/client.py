"""The KIE client: create a task, ask about a task. One attempt per call.

:func:`open_kie_client` owns one long-lived ``httpx.AsyncClient`` and gives a
:class:`KieClient` with two calls, :meth:`~KieClient.create_task` and
:meth:`~KieClient.get_status`. Each call waits its turn at a process-wide rate limiter (one
for creates, one for status queries), then makes exactly one request, bounded by
``request_timeout_s``. Retrying, backing off and giving up belong to the caller, which owns
the job's deadline.

What an answer means is read from KIE's envelope ``{"code", "msg", "data"}``: KIE reports
errors as HTTP 200 with the error in ``code``, so the envelope is the truth and the HTTP
status only speaks when there is no envelope error to read. Per ``KIE-API.md`` §4:

- 200: success.
- 429, 455, 500 and the other 5xx (not 501, 505, 531), Suno's rate codes 405 and 430,
  answers that are not JSON, network trouble: :class:`UpstreamBusyError`, transient;
  ``Retry-After`` is passed on. No answer in time: :class:`UpstreamTimeoutError`, a kind of
  busy.
- On a status query, 422 "recordInfo is null" (Veo: "record is null", "records within 14
  days"), an envelope 404 under HTTP 200, or a 200 without ``data``: KIE does not know the
  task (yet), ``TaskStatus(reading=None)``.
- Everything else (400, 401, 402, 404, 408, 409, 413, 422, 433, 451, 501, 505, 531, ...):
  :class:`UpstreamRejectedError`, not worth retrying. 401, 402 and 433 are about the account,
  not the request, and say so: "KIE API key rejected", "insufficient credits", "sub-key over
  its limit".

The API key goes out in the ``Authorization`` header only; it is never logged and never part
of a message or a ``repr``.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, cast

import httpx
import trio

from kied import __version__
from kied.core import as_int, clean_id, loads
from kied.core.families import SPECS, Family, StatusReading, read_status
from kied.core.jobs import TaskId
from kied.core.schedule import retry_after_s
from kied.errors import UpstreamBusyError as UpstreamBusyError
from kied.errors import UpstreamError, UpstreamRejectedError, UpstreamTimeoutError
from kied.kie._ratelimit import RateLimiter

if TYPE_CHECKING:
    from collections.abc import (
        AsyncGenerator,
        AsyncIterator,
        Awaitable,
        Callable,
        Iterator,
        Mapping,
    )

    from kied.core import JsonObject, JsonValue

__all__ = [
    "CREATE_LIMIT",
    "STATUS_LIMIT",
    "KieClient",
    "KieClientSettings",
    "TaskStatus",
    "UpstreamBusyError",
    "open_kie_client",
]

logger = logging.getLogger(__name__)

#: Answers longer than this are not read: no KIE answer comes near it.
_MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
#: KIE's own messages are cut to this length in kied's errors.
_MAX_MESSAGE_CHARS: Final = 300

#: Codes that are about the account, not the request: stop and tell an operator.
_ACCOUNT_CODES: Final[Mapping[int, str]] = {
    401: "KIE API key rejected (missing or invalid)",
    402: "insufficient credits on the KIE account",
    433: "KIE sub-key over its limit",
}
_BUSY_CODES: Final[Mapping[int, str]] = {
    405: "rate limited",  # Suno lyrics
    429: "rate limit exceeded",
    430: "call frequency too high",  # Suno lyrics
    455: "service unavailable (maintenance)",
}
#: 5xx codes that are answers, not trouble: the generation failed, the feature is off.
_FINAL_5XX: Final[Mapping[int, str]] = {
    501: "generation failed",
    505: "feature disabled",
    531: "generation failed, credits refunded",  # Suno
}
#: How a status endpoint says it has no record of a task (Market, Veo).
_NO_RECORD: Final = re.compile(
    r"\b(?:record(?:info)?|data) is null\b|records? within \d+ days|\bnot (?:exist|found)\b",
    re.IGNORECASE,
)


#: createTask requests per window, and the window in seconds: see ``create_limit``
CREATE_LIMIT: Final[tuple[int, float]] = (20, 10.5)
#: status queries per window, and the window in seconds: see ``status_limit``
STATUS_LIMIT: Final[tuple[int, float]] = (10, 1.05)


@dataclass(frozen=True, slots=True, kw_only=True)
class KieClientSettings:
    """Where KIE is, the key to use, and how hard to push it.

    Raises:
        ValueError: ``base_url`` is not an http(s) URL, or a duration or limit is out of range.
    """

    base_url: str
    #: None sends no ``Authorization`` header (KIE answers 401)
    api_key: str | None = field(repr=False)
    #: one request, from sending to the last byte of the answer
    request_timeout_s: float = 30.0
    #: ``(requests, per seconds)`` for creating tasks: KIE allows 20 per 10 s per account.
    #: The windows carry a margin: a slot is counted from when it is granted here, but KIE
    #: counts a request when it arrives, a few milliseconds later, so a full window of
    #: grants sent back to back would otherwise reach KIE slightly closer together.
    create_limit: tuple[int, float] = CREATE_LIMIT
    #: ``(requests, per seconds)`` for status queries: Market allows 10 per second per key
    #: (the same 5 % margin)
    status_limit: tuple[int, float] = STATUS_LIMIT
    #: ``(requests, per seconds)``: kied's own status-query budget, kept by the same
    #: limiter at the moment a query is sent; None: KIE's limit alone
    status_budget: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        try:
            url = httpx.URL(self.base_url)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, got {self.base_url!r}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        for name in ("create_limit", "status_limit", "status_budget"):
            if getattr(self, name) is None:
                continue
            limit, window_s = getattr(self, name)
            if limit < 1 or not (math.isfinite(window_s) and window_s > 0):
                raise ValueError(
                    f"{name} must be (requests >= 1, seconds > 0), got {limit}, {window_s}"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatus:
    """What a status query said about a task."""

    #: None when KIE does not know the task (yet): ``{"code": 422, "msg": "recordInfo is
    #: null"}``, Veo's "record is null", a 404, or an answer with no ``data``
    reading: StatusReading | None
    #: with no reading: KIE's answer, as said in logs and in the job's ``last_error`` (not
    #: compared: two answers that both say "no record" say the same)
    answer: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class _Answer:
    """One HTTP answer, read."""

    http_status: int
    content_type: str
    envelope: JsonObject | None  # the body, when it is a JSON object
    retry_after_s: float | None

    @property
    def code(self) -> int | None:
        return None if self.envelope is None else as_int(self.envelope.get("code"))

    @property
    def message(self) -> str:
        """KIE's ``msg`` (or ``message``), or a description of a body that had none."""
        if self.envelope is not None:
            for key in ("msg", "message"):
                text = self.envelope.get(key)
                if isinstance(text, str) and text.strip():
                    return _shorten(text.strip())
            return "no message"
        return f"HTTP {self.http_status}, {self.content_type or 'no content type'}, not JSON"


class _NoRecord:
    """The status endpoint has no record of the task."""


_NO_RECORD_ANSWER: Final = _NoRecord()


class KieClient:
    """KIE's create and status endpoints, rate-limited, one attempt per call.

    Made by :func:`open_kie_client`, which owns its HTTP client.
    """

    def __init__(self, *, http: httpx.AsyncClient, settings: KieClientSettings) -> None:
        self._http = http
        self._timeout_s = settings.request_timeout_s
        self._create_limiter = RateLimiter(*settings.create_limit)
        budget = settings.status_budget
        self._status_limiter = RateLimiter(
            *settings.status_limit, also=() if budget is None else (budget,)
        )

    async def create_task(
        self,
        family: Family,
        *,
        model: str | None,
        input: JsonObject,
        callback_url: str | None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> TaskId:
        """Create a KIE task (POST the family's create endpoint).

        Args:
            family: which API family; it decides the endpoint and the body's shape.
            model: Market sends ``{"model", "callBackUrl", "input"}``; every other family
                sends ``input``'s fields at the top level, with ``model`` (when given) and
                ``callBackUrl`` beside them.
            input: the generation request.
            callback_url: where KIE should POST the outcome; None asks for no callback. It
                always replaces any ``callBackUrl`` in ``input``.
            before_send: awaited once the rate limiter let the request through, just
                before it is sent (to record that it is in flight); if it raises, nothing
                is sent and the exception propagates.

        Returns:
            The new task's id (``data.taskId``).

        Raises:
            UpstreamRejectedError: KIE refused the task (bad input, key, credits, ...);
                sending it again will not help.
            UpstreamBusyError: KIE could not take it now (``retry_after_s`` if KIE said
                how long to wait). When ``outcome_unknown`` is set (no answer came: a
                timeout, or the connection broke after sending) KIE may have created the
                task.
            UpstreamError: KIE answered 200 without a task id.

        Cancellation:
            Safe to cancel at any point; if the request was already sent, KIE may have
            created the task. The wait for the rate limiter has no deadline of its own (the
            caller's scope bounds it); the request itself is bounded by
            ``request_timeout_s``.

        Resource handling:
            Uses the shared HTTP client; holds nothing after returning.
        """
        spec = SPECS[family]
        body = _create_body(family, model=model, input=input, callback_url=callback_url)
        what = f"createTask ({family.value})"
        await self._create_limiter.acquire()
        if before_send is not None:
            await before_send()
        answer = await self._exchange("POST", spec.create_path, what, json=body)
        data = _data(answer, what, status_query=False)
        task_id = None
        if isinstance(data, dict):
            task_id = clean_id(data.get("taskId")) or clean_id(data.get("task_id"))
        if task_id is None:
            raise UpstreamError(f"{what}: KIE answered code 200 without data.taskId")
        return TaskId(task_id)

    async def get_status(self, family: Family, task_id: TaskId) -> TaskStatus:
        """Ask KIE about a task (GET the family's status endpoint with ``?taskId=``).

        Args:
            family: the task's API family; its map reads the answer.
            task_id: KIE's id of the task.

        Returns:
            The reading of the answer's ``data`` (:func:`kied.core.families.read_status`),
            or ``TaskStatus(reading=None)`` when KIE has no record of the task.

        Raises:
            UpstreamBusyError: try again later (``UpstreamTimeoutError`` when no answer came
                in time).
            UpstreamRejectedError: KIE refused the query (key, credits, ...).

        Cancellation:
            Safe to cancel at any point. The wait for the rate limiter has no deadline of its
            own; the request itself is bounded by ``request_timeout_s``.

        Resource handling:
            Uses the shared HTTP client; holds nothing after returning.
        """
        spec = SPECS[family]
        what = f"status of task {task_id} ({family.value})"
        await self._status_limiter.acquire()
        answer = await self._exchange("GET", spec.status_path, what, params={"taskId": task_id})
        data = _data(answer, what, status_query=True)
        if isinstance(data, _NoRecord) or data is None:
            said = answer.message
            if answer.envelope is not None:
                code = "" if answer.code is None else f", code {answer.code}"
                said = f"HTTP {answer.http_status}{code}: {said}"
            return TaskStatus(reading=None, answer=said)
        return TaskStatus(reading=read_status(family, data))

    async def _exchange(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, str] | None = None,
        json: JsonObject | None = None,
    ) -> _Answer:
        try:
            with trio.fail_after(self._timeout_s), _map_http_errors(what):
                async with self._http.stream(method, path, params=params, json=json) as response:
                    body = await _read_body(response, what)
        except trio.TooSlowError as exc:
            raise UpstreamTimeoutError(
                f"{what}: KIE did not answer within {self._timeout_s:g} s", outcome_unknown=True
            ) from exc
        answer = _Answer(
            http_status=response.status_code,
            content_type=response.headers.get("content-type", ""),
            envelope=_envelope(body),
            retry_after_s=retry_after_s(response.headers.get("retry-after")),
        )
        logger.debug(
            "[GEN] KIE %s %s -> HTTP %d, code %s",
            method,
            path,
            answer.http_status,
            answer.code,
            extra={"action": "kie_request", "path": path, "http_status": answer.http_status},
        )
        return answer


@asynccontextmanager
async def open_kie_client(
    settings: KieClientSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[KieClient]:
    """Open the process-wide KIE client.

    Args:
        settings: where KIE is, the key, the timeout and the rate limits.
        transport: an ``httpx`` transport to use instead of the network (tests: a
            ``MockTransport``, or an ``ASGITransport`` in front of the simulator).

    Yields:
        The client. Its rate limits hold for every caller that shares it.

    Cancellation:
        Closing is bounded: pooled connections are closed without waiting on the peer.

    Resource handling:
        Owns one ``httpx.AsyncClient`` (and its connection pool), closed on exit. It does
        not read proxies or certificates from the environment.
    """
    headers = {"Accept": "application/json", "User-Agent": f"kied/{__version__}"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    async with httpx.AsyncClient(
        base_url=settings.base_url,
        headers=headers,
        timeout=httpx.Timeout(settings.request_timeout_s),
        transport=transport,
        trust_env=False,
        follow_redirects=False,
    ) as http:
        yield KieClient(http=http, settings=settings)


# -- requests -----------------------------------------------------------------------------


def _create_body(
    family: Family, *, model: str | None, input: JsonObject, callback_url: str | None
) -> JsonObject:
    if family is Family.MARKET:
        body: JsonObject = {} if model is None else {"model": model}
        if callback_url is not None:
            body["callBackUrl"] = callback_url
        body["input"] = input
        return body
    # kied decides where callbacks go: the caller's callBackUrl never leaks through.
    body = {key: value for key, value in input.items() if key != "callBackUrl"}
    if model is not None:
        body["model"] = model
    if callback_url is not None:
        body["callBackUrl"] = callback_url
    return body


@contextmanager
def _map_http_errors(what: str) -> Iterator[None]:
    """httpx's failures as kied's: a timeout is a timeout, the rest is network trouble.

    Only a failure to connect proves the request never reached KIE; after that, KIE may
    have acted on it (``outcome_unknown``).
    """
    try:
        yield
    except httpx.TimeoutException as exc:
        unsent = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
        raise UpstreamTimeoutError(
            f"{what}: KIE did not answer in time ({type(exc).__name__})",
            outcome_unknown=not unsent,
        ) from exc
    except httpx.HTTPError as exc:
        raise UpstreamBusyError(
            f"{what}: cannot reach KIE: {type(exc).__name__}: {exc}",
            outcome_unknown=not isinstance(exc, httpx.ConnectError),
        ) from exc


async def _read_body(response: httpx.Response, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    # aclosing: leaving early must close the generator here, not in the garbage collector.
    stream = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
    async with aclosing(stream):
        async for chunk in stream:
            size += len(chunk)
            if size > _MAX_ANSWER_BYTES:
                raise UpstreamBusyError(
                    f"{what}: KIE's answer is longer than {_MAX_ANSWER_BYTES} bytes",
                    code=response.status_code,
                )
            chunks.append(chunk)
    return b"".join(chunks)


# -- answers ------------------------------------------------------------------------------


def _envelope(body: bytes) -> JsonObject | None:
    try:
        value = loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 1] + "…"


def _no_record(code: int, message: str, http_status: int) -> bool:
    # An envelope 404 under HTTP 200 is KIE not knowing the id; under HTTP 404 it is more
    # likely a wrong endpoint (base URL), which must not pass for "not created yet".
    if code == 404:
        return 200 <= http_status < 300
    return code == 422 and _NO_RECORD.search(message) is not None


def _data(answer: _Answer, what: str, *, status_query: bool) -> JsonValue | _NoRecord:
    """The answer's ``data`` if it is a success; else the error it is (or "no record")."""
    envelope = answer.envelope
    code = answer.code
    from_envelope = code is not None and code != 200
    if not from_envelope:
        if not 200 <= answer.http_status < 300:
            code = answer.http_status
        elif envelope is None:
            raise UpstreamBusyError(
                f"{what}: KIE's answer is not JSON ({answer.message})",
                code=answer.http_status,
                retry_after_s=answer.retry_after_s,
            )
        elif code is None:
            raise UpstreamBusyError(
                f"{what}: KIE's answer has no envelope code", retry_after_s=answer.retry_after_s
            )
        else:
            return envelope.get("data")
    assert code is not None
    message = answer.message
    if status_query and from_envelope and _no_record(code, message, answer.http_status):
        return _NO_RECORD_ANSWER
    if code in _ACCOUNT_CODES:
        raise UpstreamRejectedError(code, f"{_ACCOUNT_CODES[code]}: {message}")
    if code in _BUSY_CODES or (500 <= code < 600 and code not in _FINAL_5XX):
        meaning = _BUSY_CODES.get(code, "server error")
        raise UpstreamBusyError(
            f"{what}: KIE is busy: code {code} ({meaning}): {message}",
            code=code,
            retry_after_s=answer.retry_after_s,
        )
    if code in _FINAL_5XX:
        message = f"{_FINAL_5XX[code]}: {message}"
    raise UpstreamRejectedError(code, message)
