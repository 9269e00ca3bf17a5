"""The simulator's result files: real files of their type, sized, expiring, slow or failing.

In-process under the autojump clock (the app through ``httpx.ASGITransport``) where time
matters (TTL, rate); on a real socket where streaming matters (a 2 GB file sent lazily).
"""

from __future__ import annotations

import json
import resource
import struct
import time
import zlib
from dataclasses import replace
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from kied.errors import ConfigError
from kied.kie._sim_files import DEFAULT_FILE_SIZES, MAX_FILE_SIZE, sim_file
from kied.kie.simulator import SimulatorConfig, main, parse_simulator_args, serve_simulator
from tests.integration.test_simulator import AUTH, Receiver, create_market, open_sim

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def config(**changes: Any) -> SimulatorConfig:
    return replace(SimulatorConfig(duration_s=(60.0, 60.0), seed=1), **changes)


async def fetch(api: httpx.AsyncClient, task_id: str, name: str) -> httpx.Response:
    return await api.get(f"/_sim/files/{task_id}/{name}")


async def file_stats(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    r = await api.get("/_sim/stats", params={"taskId": task_id})
    files: dict[str, Any] = r.json()["tasks"][task_id]["files"]
    return files


# ============================================================================================
# What a file is


def png_image(body: bytes) -> tuple[int, int, bytes]:
    """Width, height and raw scanlines of a PNG, checking every chunk's CRC."""
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    at, kinds, idat = 8, [], b""
    width = height = 0
    while at < len(body):
        (n,) = struct.unpack(">I", body[at : at + 4])
        kind, data = body[at + 4 : at + 8], body[at + 8 : at + 8 + n]
        (crc,) = struct.unpack(">I", body[at + 8 + n : at + 12 + n])
        assert crc == zlib.crc32(kind + data), kind
        kinds.append(kind)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", data[:10])
            assert (depth, colour) == (8, 2)
        elif kind == b"IDAT":
            idat += data
        at += 12 + n
    assert at == len(body)
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    raw = zlib.decompress(idat)  # checks the adler32 too
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


def jpeg_segments(body: bytes) -> list[int]:
    """The markers of a JPEG up to its scan, checking each segment's length fits."""
    assert body[:2] == b"\xff\xd8"
    assert body[-2:] == b"\xff\xd9"
    at, markers = 2, []
    while True:
        marker, length = struct.unpack(">HH", body[at : at + 4])
        markers.append(marker)
        at += 2 + length
        if marker == 0xFFDA:
            return markers
        assert at < len(body)


def mp4_boxes(body: bytes) -> list[bytes]:
    at, kinds = 0, []
    while at < len(body):
        size, kind = struct.unpack(">I4s", body[at : at + 8])
        kinds.append(kind)
        at += size
    assert at == len(body)
    return kinds


def mp3_frames(body: bytes) -> int:
    assert body[:5] == b"ID3\x04\x00"
    tag = 10 + sum(b << (7 * (3 - i)) for i, b in enumerate(body[6:10]))
    frames = body[tag:]
    assert len(frames) % 417 == 0
    for at in range(0, len(frames), 417):
        assert frames[at : at + 4] == b"\xff\xfb\x90\xc4"
    return len(frames) // 417


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("0.png", "image/png"),
        ("0.jpg", "image/jpeg"),
        ("0_2.jpeg", "image/jpeg"),
        ("0.mp4", "video/mp4"),
        ("1.stream.mp3", "audio/mpeg"),
        ("0.wav", "audio/wav"),
        ("0.bin", "application/octet-stream"),
    ],
)
async def test_each_file_is_a_valid_file_of_its_type(name: str, content_type: str) -> None:
    async with open_sim(config(file_size=(20 * KIB, 200 * KIB))) as (_, api):
        task_id = await create_market(api, hook=None)
        r = await fetch(api, task_id, name)
        assert r.status_code == 200
        assert r.headers["content-type"] == content_type
        body = r.content
        assert int(r.headers["content-length"]) == len(body)
        assert 20 * KIB <= len(body) <= 200 * KIB
        match name.rpartition(".")[2]:
            case "png":
                width, height, raw = png_image(body)
                assert width * height > 1000
                # pseudo-random pixels, not a flat colour
                assert len(set(raw[1 : 1 + 3 * width])) > 100
            case "jpg" | "jpeg":
                markers = jpeg_segments(body)
                assert markers[0] == 0xFFE0  # JFIF
                assert {0xFFDB, 0xFFC0, 0xFFC4, 0xFFDA} <= set(markers)
                assert body[6:11] == b"JFIF\x00"
            case "mp4":
                assert mp4_boxes(body) == [b"ftyp", b"moov", b"mdat"]
                assert body[8:12] == b"isom"
            case "mp3":
                assert mp3_frames(body) > 10
            case "wav":
                assert body[:4] == b"RIFF"
                assert body[8:16] == b"WAVEfmt "
                assert struct.unpack("<I", body[4:8])[0] == len(body) - 8
                assert struct.unpack("<I", body[40:44])[0] == len(body) - 44
            case _:
                assert len(set(body[:4096])) > 200


async def test_the_same_url_gives_the_same_bytes_and_tests_can_rebuild_them() -> None:
    sizes = (10 * KIB, 50 * KIB)
    async with open_sim(config(file_size=sizes)) as (_, api):
        one, two = await create_market(api, hook=None), await create_market(api, hook=None)
        first = (await fetch(api, one, "0.png")).content
        assert (await fetch(api, one, "0.png")).content == first
        assert b"".join(sim_file(one, "0.png", sizes).chunks()) == first
        assert sim_file(one, "0.png", sizes).size == len(first)
        assert (await fetch(api, two, "0.png")).content != first
        assert (await fetch(api, one, "1.png")).content != first


@pytest.mark.parametrize("name", ["0.png", "0.jpg", "0.mp4", "0.mp3", "0.wav", "0.bin"])
@pytest.mark.parametrize("size", [1, 600, 4096, 65_536 * 3 + 7, 3 * MIB + 1])
def test_sizes_are_exact_above_the_types_smallest_file(name: str, size: int) -> None:
    file = sim_file("task-1", name, (size, size))
    body = b"".join(file.chunks())
    assert len(body) == file.size
    smallest = sim_file("task-1", name, (1, 1)).size
    assert smallest < 600
    assert file.size == max(size, smallest)
    assert max(map(len, file.chunks())) <= 128 * KIB  # streamed in pieces


def test_sizes_are_drawn_in_the_range_and_by_type_by_default() -> None:
    sizes = {sim_file(f"t{i}", "0.png", (1000, 2000)).size for i in range(200)}
    assert min(sizes) >= 1000
    assert max(sizes) <= 2000
    assert len(sizes) > 100
    for ext, (low, high) in DEFAULT_FILE_SIZES.items():
        assert low <= sim_file("t", f"0.{ext}").size <= high


def test_a_huge_file_is_described_at_once_and_made_only_when_read() -> None:
    t0 = time.monotonic()
    for name in ("0.png", "0.jpg", "0.mp4", "0.mp3", "0.wav", "0.bin"):
        file = sim_file("t", name, (2 * GIB, 2 * GIB))
        assert file.size == 2 * GIB
        first = next(iter(file.chunks()))
        assert len(first) <= 128 * KIB
    assert time.monotonic() - t0 < 1.0
    assert sim_file("t", "0.mp4", (MAX_FILE_SIZE, MAX_FILE_SIZE)).size == MAX_FILE_SIZE


# ============================================================================================
# Faults: expiry, refusals, slowness


async def test_a_file_answers_404_once_the_ttl_has_passed_since_its_task_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    with trio.fail_after(600):
        async with open_sim(config(file_size=(1000, 1000), file_ttl_s=2.0), receiver) as (_, api):
            t0 = trio.current_time()
            task_id = await create_market(api)
            assert (await fetch(api, task_id, "0.png")).status_code == 200  # still running
            callback = (await receiver.next()).json()
            assert trio.current_time() - t0 == 60
            url = json.loads(callback["data"]["resultJson"])["resultUrls"][0]
            await trio.sleep(1.999)
            assert (await api.get(url)).status_code == 200
            await trio.sleep(0.001)
            r = await api.get(url)
            assert r.status_code == 404
            assert (await fetch(api, task_id, "0.jpg")).status_code == 404
            stats = await file_stats(api, task_id)
            assert stats["0.png"] == {
                "requests": 3,
                "refused": 0,
                "expired": 1,
                "served": 2,
                "bytes_sent": 2000,
            }
            assert stats["0.jpg"]["expired"] == 1


async def test_files_never_expire_by_default(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim(config(file_size=(1000, 1000))) as (_, api):
        task_id = await create_market(api, hook=None)
        await trio.sleep(14 * 24 * 3600)
        assert (await fetch(api, task_id, "0.png")).status_code == 200


async def test_the_first_n_requests_for_each_file_answer_503() -> None:
    async with open_sim(config(file_size=(1000, 1000), file_fail_first=2)) as (_, api):
        task_id = await create_market(api, hook=None)
        statuses = [(await fetch(api, task_id, "0.png")).status_code for _ in range(4)]
        assert statuses == [503, 503, 200, 200]
        assert (await fetch(api, task_id, "0.mp4")).status_code == 503  # counted per file
        stats = await file_stats(api, task_id)
        assert stats["0.png"] == {
            "requests": 4,
            "refused": 2,
            "expired": 0,
            "served": 2,
            "bytes_sent": 2000,
        }
        assert stats["0.mp4"]["refused"] == 1
        totals = (await api.get("/_sim/stats")).json()["totals"]
        assert (totals["file_requests"], totals["file_bytes_sent"]) == (5, 2000)
        assert (await fetch(api, "no-such-task", "0.png")).status_code == 404


async def test_a_slow_file_is_sent_at_the_set_rate(autojump_clock: trio.testing.MockClock) -> None:
    async with open_sim(config(file_size=(50_000, 50_000), file_bytes_per_s=100_000.0)) as (_, api):
        task_id = await create_market(api, hook=None)
        t0 = trio.current_time()
        r = await fetch(api, task_id, "0.bin")
        assert len(r.content) == 50_000
        assert trio.current_time() - t0 == pytest.approx(0.5)


async def test_a_slow_file_on_a_real_socket(nursery: trio.Nursery) -> None:
    cfg = SimulatorConfig(port=0, duration_s=(0.0, 0.0), file_size=(40_000, 40_000))
    cfg = replace(cfg, file_bytes_per_s=200_000.0)
    with trio.fail_after(10):
        url = await nursery.start(partial(serve_simulator, cfg))
        async with httpx.AsyncClient(base_url=url, headers=AUTH, trust_env=False) as api:
            task_id = await create_market(api, hook=None)
            t0 = time.monotonic()
            seen: list[float] = []
            async with api.stream("GET", f"/_sim/files/{task_id}/0.bin") as r:
                async for chunk in r.aiter_raw():
                    seen.append(time.monotonic() - t0)
                    assert chunk
            elapsed = time.monotonic() - t0
            assert 0.18 <= elapsed < 0.6  # 40 kB at 200 kB/s: 0.2 s
            # in pieces, as it goes (about 20 a second)
            assert len(seen) >= 4
            assert seen[0] < 0.12
    nursery.cancel_scope.cancel()


async def test_a_2_gb_file_announces_its_length_and_is_made_only_as_it_is_read(
    nursery: trio.Nursery,
) -> None:
    cfg = SimulatorConfig(port=0, duration_s=(0.0, 0.0), file_size=(2 * GIB, 2 * GIB))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with trio.fail_after(10):
        url = await nursery.start(partial(serve_simulator, cfg))
        async with httpx.AsyncClient(base_url=url, headers=AUTH, trust_env=False) as api:
            task_id = await create_market(api, hook=None)
            # A raw socket: read the head and 1 MiB of the body, then hang up.
            t0 = time.monotonic()
            host, port = url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    f"GET /_sim/files/{task_id}/0.mp4 HTTP/1.1\r\nHost: sim\r\n\r\n".encode()
                )
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some()
                head, _, body = data.partition(b"\r\n\r\n")
                assert time.monotonic() - t0 < 1.0
                assert head.startswith(b"HTTP/1.1 200")
                assert f"content-length: {2 * GIB}".encode() in head.lower()
                got = len(body)
                while got < MIB:
                    got += len(await stream.receive_some())
            await trio.sleep(0.1)  # let the server notice the client has gone
            stats = (await api.get("/_sim/stats")).json()["tasks"][task_id]["files"]["0.mp4"]
            assert stats["served"] == 0
            assert stats["bytes_sent"] < 64 * MIB
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert growth_kib < 200 * KIB
    nursery.cancel_scope.cancel()


# ============================================================================================
# Flags


def test_file_flags_parse() -> None:
    cfg = parse_simulator_args(
        ["--file-size=1K-4K", "--file-ttl=2.5", "--file-slow=512K", "--file-fail-first=3"]
    )
    assert cfg.file_size == (1024, 4096)
    assert cfg.file_ttl_s == 2.5
    assert cfg.file_bytes_per_s == 512 * 1024
    assert cfg.file_fail_first == 3
    assert parse_simulator_args(["--file-size", "2G"]).file_size == (2 * GIB, 2 * GIB)
    assert parse_simulator_args(["--file-size", "10-10m"]).file_size == (10, 10 * MIB)
    defaults = parse_simulator_args([])
    assert defaults.file_size is None
    assert defaults.file_ttl_s == float("inf")
    assert defaults.file_bytes_per_s == float("inf")
    assert defaults.file_fail_first == 0


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--file-size", "0"], "--file-size"),
        (["--file-size", "4K-1K"], "--file-size"),
        (["--file-size", "1T"], "--file-size"),
        (["--file-size", "5G"], "--file-size"),
        (["--file-size", "big"], "--file-size"),
        (["--file-ttl", "0"], "--file-ttl"),
        (["--file-ttl", "-1"], "--file-ttl"),
        (["--file-ttl", "nan"], "--file-ttl"),
        (["--file-slow", "0"], "--file-slow"),
        (["--file-slow", "1K-2K"], "--file-slow"),
        (["--file-fail-first", "-1"], "--file-fail-first"),
        (["--file-fail-first", "two"], "--file-fail-first"),
    ],
)
def test_bad_file_flags_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_simulator_args(argv)
    assert info.value.setting == flag


def test_help_documents_the_file_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--file-size", "--file-ttl", "--file-slow", "--file-fail-first"):
        assert flag in text
    assert "bytes_sent" in text
