"""The directory backend: result files kept under one local directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["DirArchive"]

#: file system calls at once: enough to keep a disk busy, few enough not to take every
#: worker thread
_THREADS = 4


class DirArchive:
    """:class:`~kied.archive.ArchiveBackend` on a local directory.

    A file is written under a temporary name in its final directory, flushed to disk and
    renamed over its key, so that a reader sees the old file or the new one, never part
    of one. Keys are relative paths; one that is absolute or holds ``..`` is refused.

    Cancellation:
        A call whose thread has started runs to its end; the cancellation is seen after.
        A temporary file left by a stopped process is overwritten by nothing and is
        removed with its job's directory.

    Resource handling:
        Holds no open file between calls.
    """

    kind = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._limiter = trio.CapacityLimiter(_THREADS)

    def describe(self) -> str:
        return f"directory {self.root}"

    def path_of(self, key: str) -> Path:
        """Where ``key`` lives on disk.

        Raises:
            ValueError: the key is empty, absolute, or holds ``..`` or a backslash.
        """
        pure = PurePosixPath(key)
        if (
            not key
            or pure.is_absolute()
            or "\\" in key
            or "\x00" in key
            or any(part in ("", ".", "..") for part in key.split("/"))
        ):
            raise ValueError(f"not an archive key: {key!r}")
        return self.root.joinpath(*pure.parts)

    async def put(
        self, key: str, source: Path, *, content_type: str, sha256: str, size: int
    ) -> None:
        target = self.path_of(key)
        await trio.to_thread.run_sync(_copy_atomically, source, target, limiter=self._limiter)

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self.path_of(key) for key in keys]
        await trio.to_thread.run_sync(_delete, paths, self.root, limiter=self._limiter)

    async def exists(self, key: str) -> bool:
        path = self.path_of(key)
        return await trio.to_thread.run_sync(path.is_file, limiter=self._limiter)

    async def presign(self, key: str, *, expires_s: float, content_type: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return None


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=".part-", dir=target.parent)
    try:
        os.close(fd)
        # copyfile copies in the kernel where it can (sendfile, copy_file_range).
        shutil.copyfile(source, temp_name)
        with open(temp_name, "rb") as copied:
            os.fsync(copied.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    # The rename is durable once the directory is.
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _delete(paths: Sequence[Path], root: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # The job's directory goes with its last file (and any leftover temporary file).
        parent = path.parent
        if parent != root:
            with contextlib.suppress(OSError):
                for leftover in parent.glob(".part-*"):
                    leftover.unlink()
                parent.rmdir()
