"""An ASGI wrapper that keeps Hypercorn's keep-alive handling working under Quart-Trio.

Hypercorn's trio worker (0.18) restarts a connection's idle timer from inside the task that
sends the response's last body message: sending it closes the stream, which puts
``http.disconnect`` on the application's queue and then starts the timer. Quart-Trio
cancels the whole request, the sending task included, as soon as it reads that
``http.disconnect``; the timer's start is then cancelled with it. Such a connection has no
idle timer: it is not closed after ``keep_alive_timeout``, and at shutdown nothing closes
it until the graceful timeout ends, so every stop with an idle keep-alive client (KIE's
callback client keeps one) took the whole graceful timeout.

:class:`KeepAliveGuard` holds back ``http.disconnect`` from the application while the last
body message is still being sent, so the send (and the timer's start) completes first. It
also answers ``Connection: close`` on HTTP/1 once the daemon is stopping, so that a client
does not reuse a connection the server is about to close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from hypercorn.typing import (
        ASGIFramework,
        ASGIReceiveCallable,
        ASGIReceiveEvent,
        ASGISendCallable,
        ASGISendEvent,
        Scope,
    )

__all__ = ["KeepAliveGuard"]

_HTTP1 = frozenset({"1.0", "1.1"})


class KeepAliveGuard:
    """Wraps an ASGI application; see the module docstring.

    Args:
        app: the ASGI application (kied's Quart-Trio app).
        stopping: whether the daemon is stopping (then HTTP/1 answers close the connection).
    """

    def __init__(self, app: ASGIFramework, *, stopping: Callable[[], bool]) -> None:
        self._app = app
        self._stopping = stopping

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Run the application for one ASGI connection.

        Cancellation: a held ``http.disconnect`` waits only for the last body message's
        send, which Hypercorn bounds; cancelling the request ends that send too.
        Resource handling: owns nothing; the server owns the connection.
        """
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        http1 = scope["http_version"] in _HTTP1
        last_sending = False
        last_sent = trio.Event()

        async def guarded_send(message: ASGISendEvent) -> None:
            nonlocal last_sending
            if message["type"] == "http.response.start" and http1 and self._stopping():
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"
                ]
                message = cast(
                    "ASGISendEvent", {**message, "headers": [*headers, (b"connection", b"close")]}
                )
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send(message)
                return
            last_sending = True
            try:
                await send(message)
            finally:
                last_sent.set()

        async def guarded_receive() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] == "http.disconnect" and last_sending:
                await last_sent.wait()
            return message

        await self._app(scope, guarded_receive, guarded_send)
