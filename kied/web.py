"""The HTTP layer: routes only. Business logic lives in the services it is handed."""

from __future__ import annotations

import codecs
import hashlib
import hmac
import json
import logging
import math
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import trio
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from kied._times import parse_instant
from kied.api import MAX_WAIT_S, BadRequestError, JobsService, job_to_json, read_body
from kied.core.views import iso
from kied.core.webhooks import safe_url
from kied.errors import StoreUnavailableError
from kied.intake import CallbackIntake, RawCallback
from kied.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kied.settings import is_loopback

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from kied.archive import ArchiveBackend
    from kied.core.jobs import ArchivedFile
    from kied.metrics import Metrics
    from kied.settings import Settings
    from kied.store import Delivery, DeliveryAttempt, Event, StoredCallback

__all__ = ["DaemonStatus", "create_app"]

logger = logging.getLogger(__name__)

# A body is read to its end so that the sender gets its 200, but no more than this is
# drained from a sender that never stops; what is kept is bounded separately.
_DRAIN_LIMIT = 64 * 1024 * 1024
_BODY_READ_S = 10.0
#: ``GET /v1/events`` reads storage at least this often while it waits: a change made by
#: another instance may not wake it.
_EVENTS_RECHECK_S = 1.0
#: An event stream with nothing to say sends a comment this often, so that proxies keep it.
_KEEP_ALIVE_S = 15.0
_METADATA_PREFIX = "metadata."
_MAX_METADATA_KEY = 200
#: The callback trail shows at most this much of each body.
_CALLBACK_BODY_SHOWN = 64 * 1024
#: What a client told that storage is unavailable is asked to wait before trying again.
_RETRY_AFTER_S = 5
_CALLBACK_PREFIX = "/callbacks/"


class DaemonStatus(Protocol):
    """What the health and metrics endpoints report."""

    @property
    def metrics(self) -> Metrics: ...

    def health(self) -> dict[str, Any]: ...

    async def readiness(self) -> str | None:
        """``None`` when storage answers, else why not."""
        ...


def create_app(
    *,
    callbacks: CallbackIntake,
    jobs: JobsService,
    status: DaemonStatus,
    settings: Settings,
    archive: ArchiveBackend | None = None,
) -> QuartTrio:
    """Build the Quart-Trio app.

    Args:
        callbacks: stores and applies every callback.
        jobs: the jobs API.
        status: answers ``/healthz``, ``/readyz`` and ``/metrics``, and counts callbacks'
            answers.
        settings: limits for callback bodies, and the API token.
        archive: where result files are kept (``GET /v1/jobs/{id}/files/{n}``); None:
            nowhere.
    """
    app = QuartTrio("kied")
    # The callback route bounds bodies itself; every other body is refused beyond this.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.request_class = _BoundedRequest
    max_request_bytes = settings.max_request_bytes
    max_callback_bytes = settings.max_callback_bytes
    oversized_keep_bytes = settings.oversized_keep_bytes
    metrics = status.metrics

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return status.health()

    last_unready: list[str] = []

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        reason = await status.readiness()
        if reason is None:
            last_unready.clear()
            return {"status": "ready"}, 200
        if last_unready != [reason]:
            # The detail (host names, the driver's words) is for the log, once per change.
            logger.warning("[HTTP] not ready: %s", reason)
            last_unready[:] = [reason]
        if not is_loopback(request.remote_addr or ""):
            reason = "storage unavailable"
        return {"status": "unavailable", "reason": reason}, 503

    metrics_auth = _metrics_authorizer(settings)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response | tuple[dict[str, Any], int]:
        refusal = metrics_auth()
        if refusal is not None:
            return refusal
        return Response(metrics.exposition(), status=200, content_type=METRICS_CONTENT_TYPE)

    async def callback() -> tuple[dict[str, Any], int]:
        answer: dict[str, Any]
        try:
            raw = await _read_callback(max_callback_bytes, oversized_keep_bytes)
            receipt = await callbacks.handle(raw)
        except Exception:
            # KIE retries anything but 200, without end: the answer is 200 whatever
            # happened here, and the failure is logged loudly instead.
            logger.exception("[KIE_CALLBACK] callback could not be recorded")
            metrics.callback_unstored()
            answer = {"status": "received", "stored": False}
        else:
            if receipt.record is not None:
                answer = {"status": "received", "stored": True, "id": receipt.record.inbox_id}
            elif receipt.journal_id is not None:
                # Kept on disk, fsynced; written to storage once it answers again.
                answer = {"status": "received", "stored": True, "journal": True}
            else:
                answer = {"status": "received", "stored": False, "dropped": receipt.dropped}
        code = 200
        metrics.callback_answered(code)
        return answer, code

    app.add_url_rule("/callbacks/kie", "callback", callback, methods=["POST"], strict_slashes=False)
    app.add_url_rule("/callbacks/kie/", "callback_slash", callback, methods=["POST"])

    _add_jobs_api(app, jobs, settings.api_token)
    _add_deliveries_api(app, jobs)
    presign_s = getattr(settings.archive, "presign_expires_s", 300.0)
    _add_files_api(app, jobs, archive, presign_s)

    @app.errorhandler(BadRequestError)
    async def bad_request(exc: BadRequestError) -> tuple[dict[str, Any], int]:
        return _bad(exc.field, exc.detail)

    @app.before_request
    async def bound_body() -> tuple[dict[str, Any], int, dict[str, str]] | None:
        length = request.content_length
        if length is not None and length > max_request_bytes and not _is_callback(request.path):
            return _too_large(max_request_bytes)
        return None

    @app.errorhandler(RequestEntityTooLarge)
    async def too_large(
        exc: RequestEntityTooLarge,
    ) -> tuple[dict[str, Any], int, dict[str, str]]:
        return _too_large(max_request_bytes)

    @app.errorhandler(StoreUnavailableError)
    async def unavailable(exc: StoreUnavailableError) -> tuple[dict[str, Any], int, dict[str, str]]:
        logger.warning("[HTTP] %s %s: storage unavailable: %s", request.method, request.path, exc)
        return (
            {"error": "storage unavailable", "detail": "try again later"},
            503,
            {"Retry-After": str(_RETRY_AFTER_S)},
        )

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        return {"error": exc.name.lower(), "detail": exc.description}, exc.code or 500

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        logger.exception("[HTTP] %s %s failed", request.method, request.path)
        return {"error": "internal error", "detail": "see the daemon's log"}, 500

    return app


def _metrics_authorizer(
    settings: Settings,
) -> Callable[[], tuple[dict[str, Any], int] | None]:
    """Who may read ``/metrics``: with ``KIED_METRICS_TOKEN``, whoever sends it; without it,
    loopback clients, and others that send ``KIED_API_TOKEN``."""
    if settings.metrics_token is not None:
        accepted = [f"Bearer {settings.metrics_token}".encode()]
        hint = "send Authorization: Bearer KIED_METRICS_TOKEN"
    else:
        accepted = [f"Bearer {settings.api_token}".encode()] if settings.api_token else []
        hint = (
            "from another machine, send Authorization: Bearer KIED_API_TOKEN"
            " or set KIED_METRICS_TOKEN"
        )

    def refusal() -> tuple[dict[str, Any], int] | None:
        if settings.metrics_token is None and is_loopback(request.remote_addr or ""):
            return None
        given = request.headers.get("authorization", "").encode()
        # Every accepted value is compared, in constant time, whatever the first said.
        if any([hmac.compare_digest(given, token) for token in accepted]):
            return None
        return {"error": "unauthorized", "detail": hint}, 401

    return refusal


def _add_jobs_api(app: QuartTrio, jobs: JobsService, api_token: str | None) -> None:
    expected = f"Bearer {api_token}".encode() if api_token else None

    @app.before_request
    async def require_token() -> tuple[dict[str, Any], int] | None:
        if expected is None or not request.path.startswith("/v1/"):
            return None
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return {
                "error": "unauthorized",
                "detail": "send Authorization: Bearer KIED_API_TOKEN",
            }, 401
        return None

    @app.post("/v1/jobs")
    async def submit() -> tuple[dict[str, Any], int]:
        body = read_body(await request.body)
        job, created = await jobs.submit(body)
        return job_to_json(job), 201 if created else 200

    @app.get("/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> tuple[dict[str, Any], int]:
        if "wait" in request.args:
            job = await jobs.wait(job_id, _seconds_arg("wait", 0.0))
        else:
            job = await jobs.get(job_id)
        if job is None:
            return _not_found(job_id)
        return job_to_json(job), 200

    @app.get("/v1/jobs")
    async def list_jobs() -> tuple[dict[str, Any], int]:
        states = request.args.getlist("state") or None
        if states is not None:
            states = [s for value in states for s in value.split(",") if s]
        limit = _int_arg("limit", 100, low=1, high=1000)
        found = await jobs.list(states=states, limit=limit, metadata=_metadata_args() or None)
        return {"jobs": [job_to_json(job) for job in found]}, 200

    @app.delete("/v1/jobs/<job_id>")
    async def cancel(job_id: str) -> tuple[dict[str, Any], int]:
        job, changed = await jobs.cancel(job_id)
        if job is None:
            return _not_found(job_id)
        if not changed:
            return {"error": "job already ended", "job": job_to_json(job)}, 409
        return job_to_json(job), 200

    @app.get("/v1/jobs/<job_id>/callbacks")
    async def job_callbacks(job_id: str) -> tuple[dict[str, Any], int]:
        limit = _int_arg("limit", 100, low=1, high=1000)
        trail = await jobs.callbacks(job_id, limit=limit)
        if trail is None:
            return _not_found(job_id)
        return {"callbacks": [_callback_to_json(c) for c in trail]}, 200

    @app.get("/v1/events")
    async def events() -> Response | tuple[dict[str, Any], int]:
        after = _int_arg("after", 0, low=0)
        limit = _int_arg("limit", 100, low=1, high=1000)
        if "text/event-stream" in request.headers.get("accept", ""):
            last_seen = request.headers.get("last-event-id", "").strip()
            if last_seen:
                after = _whole_number("Last-Event-ID", last_seen, low=0)
            response = Response(
                _event_stream(jobs, after, limit),
                status=200,
                content_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
            # The stream lasts until the client goes away: no response timeout.
            response.timeout = None
            return response
        found = await _events_after(jobs, after, limit, _seconds_arg("wait", 0.0))
        return {
            "events": [_event_to_json(event) for event in found],
            "next_cursor": found[-1].cursor if found else after,
        }, 200


def _add_deliveries_api(app: QuartTrio, jobs: JobsService) -> None:
    # Behind the /v1 token check that _add_jobs_api installs for every /v1/ path.

    @app.get("/v1/deliveries")
    async def deliveries() -> tuple[dict[str, Any], int]:
        since = request.args.get("since")
        found = await jobs.deliveries(
            state=request.args.get("state") or None,
            event_id=request.args.get("event_id") or None,
            since=None if since is None else _instant("since", since),
            limit=_int_arg("limit", 100, low=1, high=1000),
        )
        disabled = await jobs.disabled_endpoints()
        return {
            "deliveries": [_delivery_to_json(d, attempts) for d, attempts in found],
            "disabled_endpoints": {
                safe_url(url): _without_secrets(reason, url) for url, reason in disabled.items()
            },
        }, 200

    @app.post("/v1/deliveries/redeliver")
    async def redeliver() -> tuple[dict[str, Any], int]:
        body = read_body(await request.body)
        if not isinstance(body, dict):
            return _bad("body", 'must be a JSON object: {"event_id": …} or {"failed_since": …}')
        unknown = sorted(set(body) - {"event_id", "failed_since"})
        if unknown:
            return _bad(unknown[0], "is not a field of a redelivery (event_id, failed_since)")
        event_id = body.get("event_id")
        if event_id is not None and not isinstance(event_id, str):
            return _bad("event_id", "must be an event id (evt_…)")
        failed_since = body.get("failed_since")
        count = await jobs.redeliver(
            event_id=event_id,
            failed_since=None if failed_since is None else _instant("failed_since", failed_since),
        )
        return {"redelivered": count}, 200


def _int_arg(name: str, default: int, *, low: int, high: int | None = None) -> int:
    text = request.args.get(name)
    return default if text is None else _whole_number(name, text, low=low, high=high)


def _whole_number(name: str, text: str, *, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadRequestError(name, "must be a whole number") from None
    if high is not None and not low <= value <= high:
        raise BadRequestError(name, f"must be between {low} and {high}")
    if value < low:
        raise BadRequestError(name, f"must be {low} or more")
    return value


def _seconds_arg(name: str, default: float) -> float:
    text = request.args.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequestError(name, "must be a number of seconds") from None
    if not 0 <= value <= MAX_WAIT_S:
        raise BadRequestError(name, f"must be between 0 and {MAX_WAIT_S:g} seconds")
    return value


def _instant(name: str, value: object) -> float:
    """Epoch seconds from a number of them, or from an ISO 8601 time (UTC unless it says)."""
    if isinstance(value, str):
        try:
            return parse_instant(value)
        except ValueError as exc:
            raise BadRequestError(name, str(exc)) from None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise BadRequestError(name, "must be epoch seconds or an ISO 8601 time")


def _metadata_args() -> dict[str, str]:
    """``?metadata.KEY=VALUE`` filters: a job matches when it has every one."""
    wanted: dict[str, str] = {}
    for name in request.args:
        if not name.startswith(_METADATA_PREFIX):
            continue
        key = name.removeprefix(_METADATA_PREFIX)
        if not key or len(key) > _MAX_METADATA_KEY:
            raise BadRequestError(name, "the key must be 1 to 200 characters")
        values = set(request.args.getlist(name))
        if len(values) > 1:
            raise BadRequestError(name, "given twice with different values")
        wanted[key] = values.pop()
    return wanted


async def _events_after(jobs: JobsService, after: int, limit: int, wait_s: float) -> list[Event]:
    """The events after ``after``; when there are none, wait up to ``wait_s`` for some."""
    deadline = trio.current_time() + wait_s
    while True:
        # Taken before storage is read, so that a change in between still wakes us.
        changed = jobs.changed()
        found = await jobs.events(after=after, limit=limit)
        if found or trio.current_time() >= deadline or jobs.stopping:
            return found
        # A change made by another instance may not wake us: read storage again anyway.
        with trio.move_on_at(min(deadline, trio.current_time() + _EVENTS_RECHECK_S)):
            await changed.wait()


async def _event_stream(jobs: JobsService, after: int, limit: int) -> AsyncIterator[bytes]:
    """The events after ``after`` as Server-Sent Events, until the client goes away.

    When the daemon stops, the stream ends once it has sent what storage holds, so that
    the response completes inside the HTTP server's graceful drain.
    """
    # A first comment sends the headers at once, so the client knows it is connected.
    yield b": kied events\n\n"
    cursor = after
    keep_alive_at = trio.current_time() + _KEEP_ALIVE_S
    while True:
        changed = jobs.changed()
        found = await jobs.events(after=cursor, limit=limit)
        if found:
            yield b"".join(_event_to_sse(event) for event in found)
            cursor = found[-1].cursor
            keep_alive_at = trio.current_time() + _KEEP_ALIVE_S
            continue
        if jobs.stopping:
            return
        if trio.current_time() >= keep_alive_at:
            yield b": keep-alive\n\n"
            keep_alive_at = trio.current_time() + _KEEP_ALIVE_S
        with trio.move_on_at(min(keep_alive_at, trio.current_time() + _EVENTS_RECHECK_S)):
            await changed.wait()


def _event_to_json(event: Event) -> dict[str, Any]:
    return {
        "cursor": event.cursor,
        "id": event.id,
        "type": event.type,
        "created_at": iso(event.created_at),
        "job": event.job,
    }


def _event_to_sse(event: Event) -> bytes:
    data = json.dumps(_event_to_json(event), ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.cursor}\nevent: {event.type}\ndata: {data}\n\n".encode()


def _callback_to_json(stored: StoredCallback) -> dict[str, Any]:
    entry = stored.entry
    shown = entry.body[:_CALLBACK_BODY_SHOWN]
    # A character cut in two by the cut is dropped rather than shown as a stray U+FFFD.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return {
        "id": stored.id,
        "received_at": iso(entry.received_at),
        "task_id": entry.task_id,
        "found_by": entry.found_by,
        "outcome": entry.outcome,
        "problem": entry.problem,
        "authenticated": entry.authenticated,
        "auth": entry.auth,
        "effect": stored.effect.value,
        "body_size": entry.body_size,
        "content_type": entry.content_type,
        "body": decoder.decode(shown, final=len(shown) == len(entry.body)),
    }


def _delivery_to_json(delivery: Delivery, attempts: Sequence[DeliveryAttempt]) -> dict[str, Any]:
    endpoint = delivery.endpoint
    return {
        "id": delivery.id,
        "event_id": delivery.event_id,
        "type": delivery.type,
        "job_id": delivery.job_id,
        "endpoint": safe_url(endpoint),
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at),
        "created_at": iso(delivery.created_at),
        "updated_at": iso(delivery.updated_at),
        "delivered_at": iso(delivery.delivered_at),
        "last_status": delivery.last_status,
        "last_error": _without_secrets(delivery.last_error, endpoint),
        "history": [
            {
                "attempted_at": iso(a.attempted_at),
                "status_code": a.status_code,
                "duration_ms": round(a.duration_s * 1000, 1),
                "error": _without_secrets(a.error, endpoint),
            }
            for a in attempts
        ],
    }


def _without_secrets(text: str | None, endpoint: str) -> str | None:
    """``text`` (an error about ``endpoint``) with the endpoint's query and password hidden."""
    if text is None:
        return None
    parts = urlsplit(endpoint)
    text = text.replace(endpoint, safe_url(endpoint))
    for secret in (parts.query, parts.password):
        if secret:
            text = text.replace(secret, "…")
    return text


class _BoundedRequest(TrioRequest):
    """A request whose body is bounded by ``MAX_CONTENT_LENGTH``, except a callback's:
    the callback route reads and bounds its body itself. Beyond the bound nothing more is
    buffered."""

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        if _is_callback(path):
            kwargs["max_content_length"] = None
        super().__init__(method, scheme, path, *args, **kwargs)


def _is_callback(path: str) -> bool:
    return path.startswith(_CALLBACK_PREFIX)


def _too_large(limit: int) -> tuple[dict[str, Any], int, dict[str, str]]:
    # The rest of the body is not read: the connection cannot carry another request.
    return (
        {
            "error": "request too large",
            "detail": f"a request body may hold at most {limit} bytes (KIED_MAX_REQUEST_BYTES)",
            "limit": limit,
        },
        413,
        {"Connection": "close"},
    )


def _add_files_api(
    app: QuartTrio, jobs: JobsService, archive: ArchiveBackend | None, presign_s: float
) -> None:
    @app.get("/v1/jobs/<job_id>/files/<n>")
    async def job_file(job_id: str, n: str) -> Response | tuple[dict[str, Any], int]:
        job = await jobs.get(job_id)
        if job is None:
            return _not_found(job_id)
        index = int(n) if n.isdigit() and len(n) < 6 else -1
        if not 0 <= index < len(job.result_urls):
            return {"error": "not found", "detail": f"job {job_id!r} has no file {n!r}"}, 404
        kept = next((f for f in job.files if f.n == index), None)
        if kept is None or archive is None:
            state = None if job.archive_state is None else job.archive_state.value
            return {
                "error": "not archived",
                "detail": f"file {index} of job {job_id!r} is not kept by kied"
                + (f" (archive {state})" if state else " (archiving is off)"),
                "archive": state,
                "last_error": job.last_error,
                "kie_url": job.result_urls[index],
            }, 409
        redirect = await archive.presign(
            kept.key, expires_s=presign_s, content_type=kept.content_type
        )
        if redirect is not None:
            return Response("", status=307, headers={"Location": redirect})
        path_of = getattr(archive, "path_of", None)
        if path_of is None:
            return {"error": "not found", "detail": "the archive serves no local files"}, 404
        return await _file_response(kept, path_of(kept.key))


async def _file_response(kept: ArchivedFile, path: Any) -> Response | tuple[dict[str, Any], int]:
    """The file at ``path``: whole, or one byte range (``Range: bytes=…``; a request for
    several ranges gets the whole file, which HTTP allows), with its sha256 as ETag."""
    etag = f'"{kept.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, max-age=3600",
        # The type is the sender's: a browser must neither guess another nor run the file
        # as a page of kied's origin.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    given = request.headers.get("if-none-match")
    if given is not None:
        tags = {t.strip().removeprefix("W/") for t in given.split(",")}
        if etag in tags or "*" in tags:
            return Response("", status=304, headers=headers)
    try:
        size = (await trio.Path(path).stat()).st_size
    except OSError:
        return {"error": "not found", "detail": "the file is missing from the archive"}, 404
    start, end, status = 0, size - 1, 200
    wanted = request.headers.get("range", "").strip()
    if wanted and "," not in wanted:
        parsed = _byte_range(wanted, size)
        if parsed is None:
            return Response("", status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        start, end = parsed
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Type"] = kept.content_type
    headers["Content-Length"] = str(end - start + 1)
    response = Response(_read_file(path, start, end - start + 1), status=status, headers=headers)
    response.timeout = None  # a large file takes as long as the client reads it
    return response


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The first and last byte of ``Range: bytes=…`` (one range), or None when it cannot be
    satisfied (or is not understood)."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash:
        return None
    if not first.strip():  # the last N bytes
        if not last.strip().isdigit() or int(last) == 0 or size == 0:
            return None
        return max(0, size - int(last)), size - 1
    if not first.strip().isdigit() or (last.strip() and not last.strip().isdigit()):
        return None
    start = int(first)
    end = int(last) if last.strip() else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


async def _read_file(path: Any, offset: int, length: int) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as f:
        await f.seek(offset)
        while length > 0:
            chunk = await f.read(min(length, 256 * 1024))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def _bad(field: str, detail: str) -> tuple[dict[str, Any], int]:
    return {"error": "invalid request", "field": field, "detail": detail}, 400


def _not_found(job_id: str) -> tuple[dict[str, Any], int]:
    return {"error": "not found", "detail": f"no job {job_id!r}"}, 404


async def _read_callback(max_bytes: int, keep_oversized: int) -> RawCallback:
    kept = b""
    size = 0
    digest = hashlib.sha256()
    with trio.move_on_after(_BODY_READ_S):
        length = request.content_length
        if length is not None and length <= max_bytes:
            # The usual case: a small body of known length, read in one piece.
            kept = await request.body
            size = len(kept)
            digest.update(kept)
        else:
            parts = bytearray()
            async for chunk in request.body:
                size += len(chunk)
                digest.update(chunk)
                if len(parts) <= max_bytes:
                    parts += chunk[: max_bytes + 1 - len(parts)]
                if size > _DRAIN_LIMIT:
                    break
            kept = bytes(parts)
    oversized = size > max_bytes
    body = kept[:keep_oversized] if oversized else kept
    headers = {name.lower(): value for name, value in request.headers.items()}
    return RawCallback(
        body=body,
        body_size=size,
        oversized=oversized,
        query_string=request.query_string.decode("latin-1"),
        headers=headers,
        content_type=request.headers.get("content-type"),
        remote=request.remote_addr,
        body_sha256=digest.hexdigest(),
    )
