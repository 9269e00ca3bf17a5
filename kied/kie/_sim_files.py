"""The result files behind the simulator's URLs: real bytes of the right type, made lazily.

Pure functions: no Trio, no HTTP. A file is chosen by its task id and name alone (plus the
configured size range), so the same URL always gives the same bytes, and a test can rebuild
them with :func:`sim_file`. Its type follows the name's extension:

- ``.png``: an RGB image of pseudo-random pixels, its IDAT holding *stored* (level-0) deflate
  blocks, so it is large and valid without any compression work;
- ``.jpg``/``.jpeg``: a baseline JFIF (a flat grey 320x240 picture), grown to size with comment
  (COM) segments of pseudo-random bytes;
- ``.mp4``: an ISO BMFF file (``ftyp``, a ``moov`` with its ``mvhd``) and an ``mdat`` of
  pseudo-random bytes;
- ``.mp3``: an ID3v2.4 tag, then silent MPEG-1 Layer III frames (128 kbit/s, 44.1 kHz, mono);
- ``.wav``: RIFF/WAVE, 8-bit mono PCM noise;
- anything else: pseudo-random bytes as ``application/octet-stream``.

The size is exact: the requested size is met with padding each format allows (a PNG ``tEXt``
chunk, JPEG comments, ID3 padding), except that a size below the smallest file of the type is
raised to it. Bytes come from one shared pool of pseudo-random data, sliced at offsets drawn
from the file's key, so making a file costs little more than copying memory, and it is made
chunk by chunk as it is sent: a 2 GB file never exists in memory.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

__all__ = ["DEFAULT_FILE_SIZES", "MAX_FILE_SIZE", "SimFile", "content_type_of", "sim_file"]

KIB: Final = 1024
MIB: Final = 1024 * KIB

#: The largest file the simulator makes (RIFF and 32-bit box sizes hold it).
MAX_FILE_SIZE: Final = 2**32 - 1

#: Per extension: (content type, default size range in bytes).
_TYPES: Final[Mapping[str, tuple[str, tuple[int, int]]]] = {
    "png": ("image/png", (1 * MIB, 4 * MIB)),
    "jpg": ("image/jpeg", (200 * KIB, 2 * MIB)),
    "jpeg": ("image/jpeg", (200 * KIB, 2 * MIB)),
    "mp4": ("video/mp4", (4 * MIB, 20 * MIB)),
    "mp3": ("audio/mpeg", (3 * MIB, 8 * MIB)),
    "wav": ("audio/wav", (10 * MIB, 40 * MIB)),
}
_OTHER: Final = ("application/octet-stream", (100 * KIB, 1 * MIB))

#: The size range each extension gets when none is configured.
DEFAULT_FILE_SIZES: Final[Mapping[str, tuple[int, int]]] = {
    ext: sizes for ext, (_, sizes) in _TYPES.items()
}

_CHUNK: Final = 64 * KIB
_POOL_SIZE: Final = 1 * MIB
#: Slices of the pool start anywhere in its first _POOL_SIZE bytes and may run this far on.
_POOL_SLACK: Final = 64 * KIB
_STEP: Final = 104_729  # a prime, so successive slices wander over the whole pool


@cache
def _pool() -> bytes:
    return random.Random(0x6B696564).randbytes(_POOL_SIZE + _POOL_SLACK)


def _slices(key: int, total: int, *, chunk: int = _CHUNK) -> Iterator[bytes]:
    """``total`` pseudo-random bytes for ``key``, as slices of at most ``chunk`` bytes."""
    pool = _pool()
    chunk = min(chunk, _POOL_SLACK)
    i = 0
    while total > 0:
        n = min(chunk, total)
        start = (key + i * _STEP) % _POOL_SIZE
        yield pool[start : start + n]
        total -= n
        i += 1


def content_type_of(name: str) -> str:
    """The ``Content-Type`` a file of this name is served with."""
    return _TYPES.get(_extension(name), _OTHER)[0]


def _extension(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


@dataclass(frozen=True, slots=True)
class SimFile:
    """One result file: its type, exact size, and a way to make its bytes in chunks."""

    name: str
    content_type: str
    size: int
    _make: Callable[[], Iterator[bytes]]

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, in order, in chunks of at most about 64 KiB."""
        return self._make()


def sim_file(task_id: str, name: str, sizes: tuple[int, int] | None = None) -> SimFile:
    """The file the simulator serves at ``/_sim/files/{task_id}/{name}``.

    Args:
        task_id: the task the file belongs to.
        name: the file name in the URL; its extension picks the type.
        sizes: the range the size is drawn from (inclusive), or ``None`` for the type's
            default (:data:`DEFAULT_FILE_SIZES`).

    Returns:
        The file; the same arguments always give the same size and bytes.
    """
    digest = hashlib.sha256(f"{task_id}/{name}".encode()).digest()
    key = int.from_bytes(digest[:8], "big")
    ext = _extension(name)
    content_type, default = _TYPES.get(ext, _OTHER)
    low, high = sizes or default
    target = low + int.from_bytes(digest[8:16], "big") % (high - low + 1)
    size, make = _MAKERS.get(ext, _other)(key, target)
    return SimFile(name, content_type, size, make)


_Made = tuple[int, "Callable[[], Iterator[bytes]]"]


# --------------------------------------------------------------------------------------------
# Anything else


def _other(key: int, target: int) -> _Made:
    size = max(target, 1)
    return size, lambda: _slices(key, size)


# --------------------------------------------------------------------------------------------
# PNG


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PNG_FIXED: Final = 8 + 25 + 12 + 2 + 4  # signature, IHDR, IEND, zlib header and adler32
_STORED_MAX: Final = 65_535
_TEXT_KEYWORD: Final = b"Comment\x00"
_TEXT_MIN: Final = 12 + len(_TEXT_KEYWORD)


def _png_size(width: int, height: int) -> int:
    raw = height * (1 + 3 * width)
    blocks = -(-raw // _STORED_MAX)
    # one IDAT chunk (12 bytes) per stored block (5 bytes of header)
    return _PNG_FIXED + 17 * blocks + raw


def _png(key: int, target: int) -> _Made:
    width = max(1, min(4096, math.isqrt(max(target, 1) // 3)))
    row = 1 + 3 * width
    height = max(1, (target - _PNG_FIXED) // row + 1)
    while height > 1:
        pad = target - _png_size(width, height)
        if pad == 0 or pad >= _TEXT_MIN:
            break
        height -= 1
    pad = target - _png_size(width, height)
    if pad < 0:  # too small for even one row: the smallest picture
        width, height = 1, 1
        pad = max(0, target - _png_size(1, 1))
    if 0 < pad < _TEXT_MIN:
        pad = _TEXT_MIN
    size = _png_size(width, height) + pad
    return size, lambda: _png_chunks(key, width, height, pad)


def _png_rows(key: int, width: int, height: int) -> Iterator[bytes]:
    """The raw scanlines, each filter type 0 (None) then ``3 * width`` pixel bytes."""
    pool = _pool()
    n = 3 * width
    # rows longer than the pool's slack are stitched from several slices
    for r in range(height):
        start = (key + r * _STEP) % _POOL_SIZE
        if n <= _POOL_SLACK:
            yield b"\x00" + pool[start : start + n]
        else:
            yield b"\x00" + b"".join(_slices(key + r * _STEP * 7919, n))


def _png_blocks(key: int, width: int, height: int) -> Iterator[bytes]:
    """The raw image data in pieces of exactly 65535 bytes (the last one shorter)."""
    buf = bytearray()
    for row in _png_rows(key, width, height):
        buf += row
        while len(buf) >= _STORED_MAX:
            yield bytes(buf[:_STORED_MAX])
            del buf[:_STORED_MAX]
    if buf:
        yield bytes(buf)


def _png_chunks(key: int, width: int, height: int, pad: int) -> Iterator[bytes]:
    yield _PNG_SIGNATURE
    # 8-bit RGB, deflate, no interlace
    yield _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if pad:
        text = b"kied simulate " * (pad // 14 + 1)
        yield _png_chunk(b"tEXt", _TEXT_KEYWORD + text[: pad - _TEXT_MIN])
    raw = height * (1 + 3 * width)
    adler = 1
    done = 0
    first = True
    for block in _png_blocks(key, width, height):
        adler = zlib.adler32(block, adler)
        done += len(block)
        last = done == raw
        n = len(block)
        data = b"".join(
            (
                b"\x78\x01" if first else b"",  # zlib: deflate, 32 KiB window, no dictionary
                bytes((1 if last else 0,)),  # BFINAL, BTYPE=00 (stored)
                struct.pack("<HH", n, n ^ 0xFFFF),
                block,
                struct.pack(">I", adler) if last else b"",
            )
        )
        first = False
        yield _png_chunk(b"IDAT", data)
    yield _png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------
# JPEG


def _segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">HH", marker, len(data) + 2) + data


_JPEG_WIDTH, _JPEG_HEIGHT = 320, 240
_JPEG_HEAD: Final = b"\xff\xd8" + _segment(0xFFE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
# One quantisation table of ones, one 8-bit grey component, and Huffman tables of a single
# one-bit code each: DC difference category 0 and AC end-of-block. Every 8x8 block is then
# the two bits "00", and the picture is a flat mid-grey.
_JPEG_TAIL: Final = b"".join(
    (
        _segment(0xFFDB, b"\x00" + b"\x01" * 64),
        _segment(0xFFC0, struct.pack(">BHHB", 8, _JPEG_HEIGHT, _JPEG_WIDTH, 1) + b"\x01\x11\x00"),
        _segment(0xFFC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00"),
        _segment(0xFFC4, b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00"),
        _segment(0xFFDA, b"\x01\x01\x00\x00\x3f\x00"),
        b"\x00" * ((_JPEG_WIDTH // 8) * (_JPEG_HEIGHT // 8) * 2 // 8),
        b"\xff\xd9",
    )
)
_COM_MAX: Final = 65_533  # data bytes in one COM segment


def _jpeg(key: int, target: int) -> _Made:
    fixed = len(_JPEG_HEAD) + len(_JPEG_TAIL)
    pad = max(0, target - fixed)
    if 0 < pad < 4:
        pad = 4
    return fixed + pad, lambda: _jpeg_chunks(key, pad)


def _jpeg_chunks(key: int, pad: int) -> Iterator[bytes]:
    yield _JPEG_HEAD
    i = 0
    while pad > 0:
        n = min(pad - 4, _COM_MAX)
        rest = pad - 4 - n
        if 0 < rest < 4:  # leave enough for the next segment's header
            n -= 4 - rest
        yield struct.pack(">HH", 0xFFFE, n + 2) + b"".join(_slices(key + i * _STEP * 7919, n))
        pad -= n + 4
        i += 1
    yield _JPEG_TAIL


# --------------------------------------------------------------------------------------------
# MP4


def _box(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data) + 8) + kind + data


_MP4_HEAD: Final = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41") + _box(
    b"moov",
    _box(
        b"mvhd",
        struct.pack(">IIIII", 0, 0, 0, 1000, 8000)  # version/flags, times, 1 kHz, 8 s
        + struct.pack(">IH", 0x00010000, 0x0100)  # rate 1.0, volume 1.0
        + b"\x00" * 10
        + struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
        + b"\x00" * 24
        + struct.pack(">I", 1),  # next track id
    ),
)


def _mp4(key: int, target: int) -> _Made:
    payload = max(0, target - len(_MP4_HEAD) - 8)
    return len(_MP4_HEAD) + 8 + payload, lambda: _mp4_chunks(key, payload)


def _mp4_chunks(key: int, payload: int) -> Iterator[bytes]:
    yield _MP4_HEAD + struct.pack(">I", payload + 8) + b"mdat"
    yield from _slices(key, payload)


# --------------------------------------------------------------------------------------------
# MP3


def _syncsafe(n: int) -> bytes:
    return bytes(((n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F))


_MP3_FRAME: Final = b"\xff\xfb\x90\xc4" + b"\x00" * 413  # 128 kbit/s, 44.1 kHz, mono, silent
_MP3_OWNER: Final = b"kied-simulate\x00"
_MP3_PRIV: Final = 32
_MP3_TAG_MIN: Final = 10 + 10 + len(_MP3_OWNER) + _MP3_PRIV


def _mp3(key: int, target: int) -> _Made:
    frames = max(1, (target - _MP3_TAG_MIN) // len(_MP3_FRAME))
    pad = max(0, target - _MP3_TAG_MIN - frames * len(_MP3_FRAME))
    return _MP3_TAG_MIN + pad + frames * len(_MP3_FRAME), lambda: _mp3_chunks(key, frames, pad)


def _mp3_chunks(key: int, frames: int, pad: int) -> Iterator[bytes]:
    priv = _MP3_OWNER + b"".join(_slices(key, _MP3_PRIV))
    frame = b"PRIV" + _syncsafe(len(priv)) + b"\x00\x00" + priv
    yield b"ID3\x04\x00\x00" + _syncsafe(len(frame) + pad) + frame + b"\x00" * pad
    per_chunk = _CHUNK // len(_MP3_FRAME)
    block = _MP3_FRAME * per_chunk
    while frames >= per_chunk:
        yield block
        frames -= per_chunk
    if frames:
        yield _MP3_FRAME * frames


# --------------------------------------------------------------------------------------------
# WAV


def _wav(key: int, target: int) -> _Made:
    data = max(1, target - 44)
    return 44 + data, lambda: _wav_chunks(key, data)


def _wav_chunks(key: int, data: int) -> Iterator[bytes]:
    rate = 22_050
    yield (
        b"RIFF"
        + struct.pack("<I", 36 + data)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)  # PCM, mono, 8-bit
        + b"data"
        + struct.pack("<I", data)
    )
    yield from _slices(key, data)


_MAKERS: Final[Mapping[str, Callable[[int, int], _Made]]] = {
    "png": _png,
    "jpg": _jpeg,
    "jpeg": _jpeg,
    "mp4": _mp4,
    "mp3": _mp3,
    "wav": _wav,
}
