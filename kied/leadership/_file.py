"""Leadership through ``flock`` on a lock file: one ACTIVE process per machine."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

import trio

from kied.errors import LeadershipLostError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from kied.settings import FileLockSettings

__all__ = ["FileLeader", "open_file_leadership"]

logger = logging.getLogger(__name__)

# How often a held lock checks that its file is still the one on disk: a lock file that
# was deleted or replaced no longer keeps another process out.
_WATCH_INTERVAL_S = 2.0


class FileLeader:
    """The held file lock."""

    def __init__(self, path: str, fd: int, acquired_at: float) -> None:
        self._path = path
        self._fd = fd
        self._acquired_at = acquired_at

    @property
    def backend(self) -> str:
        return "file"

    @property
    def acquired_at(self) -> float:
        return self._acquired_at

    async def watch(self) -> NoReturn:
        """Raise ``LeadershipLostError`` when the lock file is removed or replaced."""
        while True:
            await trio.sleep(_WATCH_INTERVAL_S)
            if not self._still_ours():
                raise LeadershipLostError(f"lock file {self._path} was removed or replaced")

    def _still_ours(self) -> bool:
        try:
            held = os.fstat(self._fd)
            on_disk = os.stat(self._path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@asynccontextmanager
async def open_file_leadership(settings: FileLockSettings) -> AsyncIterator[FileLeader]:
    """Take the file lock, waiting as long as another process holds it.

    Returns only once the lock is held. The attempt is non-blocking and repeated every
    ``settings.retry_s``, so waiting costs no thread and is cancelled at once.

    Cancellation: safe at any point; a lock taken is released on the way out.
    Resource handling: owns the lock file descriptor and closes it on exit, which
    releases the lock.
    """
    path = str(settings.path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = -1
    try:
        waiting_logged = False
        while True:
            if fd < 0:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if _try_lock(fd):
                # The file we locked may have been unlinked between open and flock.
                if FileLeader(path, fd, 0.0)._still_ours():
                    break
                os.close(fd)
                fd = -1
                continue
            if not waiting_logged:
                logger.info("[LOCK] %s is held by another process; PASSIVE until it is free", path)
                waiting_logged = True
            await trio.sleep(settings.retry_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield FileLeader(path, fd, trio.current_time())
    finally:
        if fd >= 0:
            # Closing the descriptor releases the flock; nothing here awaits.
            os.close(fd)
