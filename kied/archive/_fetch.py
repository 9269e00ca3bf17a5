"""Downloading one result file: streamed to a local file, hashed, bounded, and only from
addresses the policy allows (checked where the connection is made)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import httpcore
import httpx
import trio

from kied.archive._policy import host_allowed, refused_address, refused_url

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Collection, Iterable
    from pathlib import Path

__all__ = [
    "DownloadFailedError",
    "DownloadRefusedError",
    "Downloaded",
    "GuardedNetworkBackend",
    "download",
    "open_download_client",
]

#: Redirects followed for one file, each checked as the first URL was.
MAX_REDIRECTS: Final = 3
_CHUNK = 1024 * 1024
_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0, pool=10.0)


class DownloadRefusedError(Exception):
    """kied will not download this file: its URL, its address or its size is refused.

    Trying again cannot help. ``kind`` is one of :data:`~kied.archive._policy.REFUSAL_KINDS`.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DownloadFailedError(Exception):
    """The download failed: a network error or a 5xx (``retry``), or an answer that trying
    again will not change (a 4xx: the file is gone)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True, kw_only=True)
class Downloaded:
    """A file downloaded to ``path`` (the caller's to delete)."""

    path: Path
    sha256: str
    size: int
    content_type: str
    url: str  # the URL it came from, after redirects


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, connecting only to addresses the policy allows.

    The host name is resolved here, every address it resolves to is checked, and the
    connection is made to a checked address: what DNS answers later (rebinding) cannot
    change where kied connects. TLS is still verified against the host name, which httpcore
    passes to ``start_tls`` from the URL. A host in ``allowed`` (``host`` or ``host:port``)
    is connected to as it is.
    """

    def __init__(self, allowed: Collection[str]) -> None:
        self._allowed = frozenset(allowed)
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore calls it so
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host_allowed(host, port, self._allowed):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        with trio.fail_after(timeout if timeout is not None else 30.0):
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            why = refused_address(address)
            if why is not None:
                raise DownloadRefusedError(
                    why, f"{host} resolves to {address} ({why.replace('_', '-')} address)"
                )
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        raise httpcore.ConnectError(f"cannot connect to {host}: {last}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore calls it so
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DownloadRefusedError("scheme", "unix sockets are refused")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def open_download_client(
    allowed: Collection[str], *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client result files are downloaded with: the guarded backend, no redirects
    followed by httpx (:func:`download` follows them itself), no proxy from the
    environment, bounded timeouts. Use it with ``async with``.

    ``transport`` replaces the network (tests on the autojump clock); the address policy
    is then the transport's business.
    """
    if transport is None:
        pool = httpcore.AsyncConnectionPool(
            network_backend=GuardedNetworkBackend(allowed), max_connections=64
        )
        transport = _PoolTransport(pool)
    return httpx.AsyncClient(
        transport=transport, timeout=_TIMEOUT, follow_redirects=False, trust_env=False
    )


class _PoolTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport over a pool built with the guarded backend."""

    def __init__(self, pool: httpcore.AsyncConnectionPool) -> None:
        super().__init__()
        self._pool = pool


async def download(
    client: httpx.AsyncClient, url: str, directory: Path, *, max_bytes: int
) -> Downloaded:
    """Download ``url`` into a new file in ``directory``, following at most
    :data:`MAX_REDIRECTS` redirects, each checked as the first URL was.

    Returns:
        The file, its sha256, size and content type; the caller deletes it.

    Raises:
        DownloadRefusedError: the URL is not http(s), an address it leads to is refused,
            it redirects too often, or it is (or announces being) over ``max_bytes``.
        DownloadFailedError: the network failed or the server answered an error.

    Cancellation:
        Safe: the partial file is deleted. The caller bounds the whole download with
        ``trio.fail_after``.

    Resource handling:
        The response is closed before returning; the file is the caller's on success and
        deleted otherwise.
    """
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        why = refused_url(current)
        if why is not None:
            raise DownloadRefusedError(why, f"not an http(s) URL: {current[:200]!r}")
        try:
            async with client.stream("GET", current) as response:
                if response.is_redirect and "location" in response.headers:
                    current = str(response.url.join(response.headers["location"]))
                    continue
                return await _save(response, current, directory, max_bytes)
        except httpx.TransportError as exc:
            raise DownloadFailedError(
                f"{type(exc).__name__} from {_host(current)}: {exc}", retry=True
            ) from exc
    raise DownloadRefusedError("redirects", f"more than {MAX_REDIRECTS} redirects from {url}")


async def _save(response: httpx.Response, url: str, directory: Path, max_bytes: int) -> Downloaded:
    status = response.status_code
    if status >= 400 or status < 200 or status in (204, 205):
        retry = status >= 500 or status in (408, 429)
        raise DownloadFailedError(f"{_host(url)} answered {status}", retry=retry)
    announced = response.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > max_bytes:
        raise DownloadRefusedError(
            "too_large", f"{_host(url)} announces {announced} bytes, over {max_bytes}"
        )
    content_type = _content_type(response.headers.get("content-type", ""))
    hasher = hashlib.sha256()
    size = 0
    fd, name = await trio.to_thread.run_sync(_new_file, directory)
    path = directory / name
    try:
        # aiter_bytes is an async generator: closed here, also when the cap is hit.
        body = cast("AsyncGenerator[bytes, None]", response.aiter_bytes(_CHUNK))
        async with contextlib.aclosing(body) as chunks:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadRefusedError(
                        "too_large", f"{_host(url)} sent more than {max_bytes} bytes"
                    )
                # Hashing and writing in a worker thread keep the event loop free.
                await trio.to_thread.run_sync(_write, fd, chunk, hasher)
        await trio.to_thread.run_sync(os.close, fd)
        fd = -1
    except BaseException:
        with trio.move_on_after(5, shield=True):
            await trio.to_thread.run_sync(_discard, fd, path)
        raise
    return Downloaded(
        path=path, sha256=hasher.hexdigest(), size=size, content_type=content_type, url=url
    )


def _content_type(value: str) -> str:
    """The sender's content type when it is a plain ``type/subtype[; params]`` of sensible
    length, else ``application/octet-stream``: it is stored and served again as it is."""
    value = value.strip()
    if (
        not 3 <= len(value) <= 200
        or not value.isascii()
        or not value.isprintable()
        or "/" not in value.split(";", 1)[0]
    ):
        return "application/octet-stream"
    return value


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host or "?"
    except httpx.InvalidURL:
        return "?"


def _new_file(directory: Path) -> tuple[int, str]:
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".download-", dir=directory)
    return fd, os.path.basename(name)


def _write(fd: int, chunk: bytes, hasher: Any) -> None:
    hasher.update(chunk)
    view = memoryview(chunk)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _discard(fd: int, path: Path) -> None:
    if fd >= 0:
        os.close(fd)
    path.unlink(missing_ok=True)
