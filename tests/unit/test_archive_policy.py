"""Which addresses and URLs result files may come from, and the downloader that enforces it
where connections are made (after resolving, and after every redirect)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from kied.archive._fetch import (
    DownloadFailedError,
    DownloadRefusedError,
    GuardedNetworkBackend,
    download,
    open_download_client,
)
from kied.archive._policy import host_allowed, refused_address, refused_url

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.1.1.1", "private"),
        ("::127.0.0.1", "loopback"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("169.254.10.10", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT: not global
        ("240.0.0.1", "private"),
    ],
)
def test_addresses(address, why):
    assert refused_address(address) == why


def test_hosts_are_allowed_by_name_or_name_and_port():
    allowed = {"127.0.0.1:8081", "files.internal"}
    assert host_allowed("127.0.0.1", 8081, allowed)
    assert not host_allowed("127.0.0.1", 8082, allowed)
    assert host_allowed("FILES.internal", 443, allowed)
    assert not host_allowed("localhost", 8081, allowed)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://cdn.example/a.png", None),
        ("http://cdn.example:8080/a.png", None),
        ("ftp://cdn.example/a.png", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://x/", "scheme"),
        ("http:///nohost", "scheme"),
        ("http://cdn.example:99999999/", "scheme"),
    ],
)
def test_urls(url, why):
    assert refused_url(url) == why


async def test_every_resolved_address_is_checked_before_connecting(tmp_path: Path):
    class Resolver(trio.abc.HostnameResolver):
        async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
            assert host == b"files.example"
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
            ]

        async def getnameinfo(self, sockaddr, flags):
            raise NotImplementedError

    trio.socket.set_custom_hostname_resolver(Resolver())
    try:
        async with open_download_client([]) as client:
            with pytest.raises(DownloadRefusedError, match=r"10\.0\.0\.7") as info:
                await download(client, "https://files.example/a.png", tmp_path, max_bytes=100)
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert info.value.kind == "private"


async def test_the_backend_refuses_unix_sockets():
    with pytest.raises(DownloadRefusedError):
        await GuardedNetworkBackend([]).connect_unix_socket("/run/docker.sock")


class _Redirects:
    """A file server on 127.0.0.1 that redirects as told."""

    def __init__(self) -> None:
        self.port = 0
        self.locations: dict[str, str] = {}

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            path = head.split(b" ", 2)[1].decode()
            if path in self.locations:
                answer = f"HTTP/1.1 302 Found\r\nLocation: {self.locations[path]}\r\n"
                answer += "Content-Length: 0\r\nConnection: close\r\n\r\n"
            else:
                answer = "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 4\r\n"
                answer += "Connection: close\r\n\r\nPNG!"
            await stream.send_all(answer.encode())


@pytest.fixture
async def redirects(nursery: trio.Nursery) -> _Redirects:
    server = _Redirects()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, server.handle, listeners)
    return server


async def test_redirects_are_followed_and_each_checked(redirects: _Redirects, tmp_path: Path):
    base = f"http://127.0.0.1:{redirects.port}"
    redirects.locations = {
        "/one": "/two",
        "/two": f"{base}/file.png",
        "/away": "http://[::1]:9/x",  # another port on another loopback: not allowed
        "/ftp": "ftp://127.0.0.1/x",
        "/loop": "/loop",
    }
    async with open_download_client([f"127.0.0.1:{redirects.port}"]) as client:
        got = await download(client, f"{base}/one", tmp_path, max_bytes=100)
        assert got.path.read_bytes() == b"PNG!"
        assert (got.size, got.content_type, got.url) == (4, "image/png", f"{base}/file.png")
        with pytest.raises(DownloadRefusedError) as info:
            await download(client, f"{base}/away", tmp_path, max_bytes=100)
        assert info.value.kind == "loopback"
        with pytest.raises(DownloadRefusedError) as info:
            await download(client, f"{base}/ftp", tmp_path, max_bytes=100)
        assert info.value.kind == "scheme"
        with pytest.raises(DownloadRefusedError) as info:
            await download(client, f"{base}/loop", tmp_path, max_bytes=100)
        assert info.value.kind == "redirects"
        with pytest.raises(DownloadRefusedError) as info:
            await download(client, f"{base}/file.png", tmp_path, max_bytes=3)
        assert info.value.kind == "too_large"
    left = [p.name for p in await trio.Path(tmp_path).iterdir()]
    assert left == [got.path.name]  # no partial file


async def test_a_server_error_may_pass_and_a_missing_file_will_not(tmp_path: Path):
    answers = iter([503, 404, 429])
    transport = httpx.MockTransport(lambda request: httpx.Response(next(answers)))
    async with open_download_client([], transport=transport) as client:
        for retry in (True, False, True):
            with pytest.raises(DownloadFailedError) as info:
                await download(client, "https://cdn.example/a", tmp_path, max_bytes=10)
            assert info.value.retry is retry


async def test_odd_content_types_are_stored_as_octet_stream(tmp_path: Path):
    sent = iter(["text/html\x7f", "x" * 300, "nonsense", "", "image/png; q=1"])
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, content=b"1", headers={"Content-Type": next(sent)})
    )
    async with open_download_client([], transport=transport) as client:
        kept = [
            (await download(client, "https://cdn.example/a", tmp_path, max_bytes=10)).content_type
            for _ in range(5)
        ]
    assert kept == ["application/octet-stream"] * 4 + ["image/png; q=1"]
