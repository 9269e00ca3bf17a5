"""The HTTP layer: routes only. Business logic lives in the services it is handed."""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from kied.jobs import MAX_WAIT_S, BadRequestError, JobsService, job_to_json
from kied.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kied.service import CallbackService, RawCallback

if TYPE_CHECKING:
    from kied.metrics import Metrics
    from kied.settings import Settings

__all__ = ["DaemonStatus", "create_app"]

logger = logging.getLogger(__name__)

# A body is read to its end so that the sender gets its 200, but no more than this is
# drained from a sender that never stops; what is kept is bounded separately.
_DRAIN_LIMIT = 64 * 1024 * 1024
_BODY_READ_S = 10.0


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
    callbacks: CallbackService,
    jobs: JobsService,
    status: DaemonStatus,
    settings: Settings,
) -> QuartTrio:
    """Build the Quart-Trio app.

    Args:
        callbacks: stores and applies every callback.
        jobs: the jobs API.
        status: answers ``/healthz``, ``/readyz`` and ``/metrics``, and counts callbacks'
            answers.
        settings: limits for callback bodies, and the API token.
    """
    app = QuartTrio("kied")
    app.config["MAX_CONTENT_LENGTH"] = None  # the callback route bounds bodies itself
    max_callback_bytes = settings.max_callback_bytes
    oversized_keep_bytes = settings.oversized_keep_bytes
    metrics = status.metrics

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return status.health()

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        reason = await status.readiness()
        if reason is None:
            return {"status": "ready"}, 200
        return {"status": "unavailable", "reason": reason}, 503

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        # Unauthenticated, for the operator's scraper: keep it off the public internet.
        return Response(metrics.exposition(), status=200, content_type=METRICS_CONTENT_TYPE)

    async def callback() -> tuple[dict[str, Any], int]:
        answer: dict[str, Any]
        try:
            raw = await _read_callback(max_callback_bytes, oversized_keep_bytes)
            record = await callbacks.handle(raw)
        except Exception:
            # KIE retries anything but 200, without end: the answer is 200 whatever
            # happened here, and the failure is logged loudly instead.
            logger.exception("[KIE_CALLBACK] callback could not be recorded")
            metrics.callback_unstored()
            answer = {"status": "received", "stored": False}
        else:
            answer = {"status": "received", "stored": True, "id": record.inbox_id}
        code = 200
        metrics.callback_answered(code)
        return answer, code

    app.add_url_rule("/callbacks/kie", "callback", callback, methods=["POST"], strict_slashes=False)
    app.add_url_rule("/callbacks/kie/", "callback_slash", callback, methods=["POST"])

    _add_jobs_api(app, jobs, settings.api_token)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        return {"error": exc.name.lower(), "detail": exc.description}, exc.code or 500

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        logger.exception("[HTTP] %s %s failed", request.method, request.path)
        return {"error": "internal error", "detail": "see the daemon's log"}, 500

    return app


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
        body = await request.get_json(force=True, silent=True)
        if body is None:
            return _bad("body", "must be a JSON object")
        try:
            job, created = await jobs.submit(body)
        except BadRequestError as exc:
            return _bad(exc.field, exc.detail)
        return job_to_json(job), 201 if created else 200

    @app.get("/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> tuple[dict[str, Any], int]:
        wait = request.args.get("wait")
        if wait is None:
            job = await jobs.get(job_id)
        else:
            try:
                wait_s = float(wait)
            except ValueError:
                return _bad("wait", "must be a number of seconds")
            if not 0 <= wait_s <= MAX_WAIT_S:
                return _bad("wait", f"must be between 0 and {MAX_WAIT_S:g} seconds")
            job = await jobs.wait(job_id, wait_s)
        if job is None:
            return _not_found(job_id)
        return job_to_json(job), 200

    @app.get("/v1/jobs")
    async def list_jobs() -> tuple[dict[str, Any], int]:
        states = request.args.getlist("state") or None
        if states is not None:
            states = [s for value in states for s in value.split(",") if s]
        try:
            limit = int(request.args.get("limit", "100"))
        except ValueError:
            return _bad("limit", "must be a whole number")
        if not 1 <= limit <= 1000:
            return _bad("limit", "must be between 1 and 1000")
        try:
            found = await jobs.list(states=states, limit=limit)
        except BadRequestError as exc:
            return _bad(exc.field, exc.detail)
        return {"jobs": [job_to_json(job) for job in found]}, 200

    @app.delete("/v1/jobs/<job_id>")
    async def cancel(job_id: str) -> tuple[dict[str, Any], int]:
        job, changed = await jobs.cancel(job_id)
        if job is None:
            return _not_found(job_id)
        if not changed:
            return {"error": "job already ended", "job": job_to_json(job)}, 409
        return job_to_json(job), 200


def _bad(field: str, detail: str) -> tuple[dict[str, Any], int]:
    return {"error": "invalid request", "field": field, "detail": detail}, 400


def _not_found(job_id: str) -> tuple[dict[str, Any], int]:
    return {"error": "not found", "detail": f"no job {job_id!r}"}, 404


async def _read_callback(max_bytes: int, keep_oversized: int) -> RawCallback:
    kept = b""
    size = 0
    with trio.move_on_after(_BODY_READ_S):
        length = request.content_length
        if length is not None and length <= max_bytes:
            # The usual case: a small body of known length, read in one piece.
            kept = await request.body
            size = len(kept)
        else:
            parts = bytearray()
            async for chunk in request.body:
                size += len(chunk)
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
    )
