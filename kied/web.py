"""The HTTP layer: routes only. Business logic lives in the services it is handed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio
from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from kied.service import CallbackService, RawCallback

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["DaemonStatus", "create_app"]

logger = logging.getLogger(__name__)

# A body is read to its end so that the sender gets its 200, but no more than this is
# drained from a sender that never stops; what is kept is bounded separately.
_DRAIN_LIMIT = 64 * 1024 * 1024
_BODY_READ_S = 10.0


class DaemonStatus(Protocol):
    """What the health endpoints report."""

    def health(self) -> dict[str, Any]: ...

    async def readiness(self) -> str | None:
        """``None`` when storage answers, else why not."""
        ...


def create_app(
    *,
    callbacks: CallbackService,
    status: DaemonStatus,
    max_callback_bytes: int,
    oversized_keep_bytes: int,
    extra: Callable[[QuartTrio], None] | None = None,
) -> QuartTrio:
    """Build the Quart-Trio app.

    Args:
        callbacks: stores and applies every callback.
        status: answers ``/healthz`` and ``/readyz``.
        max_callback_bytes: larger callback bodies are recorded as oversized, not parsed.
        oversized_keep_bytes: how much of an oversized body is kept as evidence.
        extra: registers further routes (the jobs API) on the app.
    """
    app = QuartTrio("kied")
    app.config["MAX_CONTENT_LENGTH"] = None  # the callback route bounds bodies itself
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return status.health()

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        reason = await status.readiness()
        if reason is None:
            return {"status": "ready"}, 200
        return {"status": "unavailable", "reason": reason}, 503

    async def callback() -> tuple[dict[str, Any], int]:
        try:
            raw = await _read_callback(max_callback_bytes, oversized_keep_bytes)
            record = await callbacks.handle(raw)
        except Exception:
            # KIE retries anything but 200, without end: the answer is 200 whatever
            # happened here, and the failure is logged loudly instead.
            logger.exception("[KIE_CALLBACK] callback could not be recorded")
            return {"status": "received", "stored": False}, 200
        return {"status": "received", "stored": True, "id": record.inbox_id}, 200

    app.add_url_rule("/callbacks/kie", "callback", callback, methods=["POST"], strict_slashes=False)
    app.add_url_rule("/callbacks/kie/", "callback_slash", callback, methods=["POST"])

    if extra is not None:
        extra(app)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        return {"error": exc.name.lower(), "detail": exc.description}, exc.code or 500

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        logger.exception("[HTTP] %s %s failed", request.method, request.path)
        return {"error": "internal error", "detail": "see the daemon's log"}, 500

    return app


async def _read_callback(max_bytes: int, keep_oversized: int) -> RawCallback:
    kept = bytearray()
    size = 0
    with trio.move_on_after(_BODY_READ_S):
        async for chunk in request.body:
            size += len(chunk)
            if len(kept) <= max_bytes:
                kept += chunk[: max_bytes + 1 - len(kept)]
            if size > _DRAIN_LIMIT:
                break
    oversized = size > max_bytes
    body = bytes(kept[:keep_oversized] if oversized else kept)
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
