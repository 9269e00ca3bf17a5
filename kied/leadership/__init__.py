"""Leadership locks: ACTIVE while held, PASSIVE otherwise."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, NoReturn

import trio

from kied.leadership._base import Leader as Leader
from kied.leadership._file import FileLeader as FileLeader
from kied.leadership._file import open_file_leadership as open_file_leadership
from kied.settings import FileLockSettings, NoLockSettings, PgLockSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["FileLeader", "Leader", "open_file_leadership", "open_leadership"]


class _Unlocked:
    """Leadership without a lock: always ACTIVE."""

    def __init__(self, acquired_at: float) -> None:
        self._acquired_at = acquired_at

    @property
    def backend(self) -> str:
        return "none"

    @property
    def acquired_at(self) -> float:
        return self._acquired_at

    async def watch(self) -> NoReturn:
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover


@asynccontextmanager
async def open_leadership(
    settings: FileLockSettings | PgLockSettings | NoLockSettings,
) -> AsyncIterator[Leader]:
    """Hold the configured leadership lock for the duration of the block.

    Returns only once the lock is held. See :func:`open_file_leadership`.
    """
    if isinstance(settings, FileLockSettings):
        async with open_file_leadership(settings) as leader:
            yield leader
    elif isinstance(settings, NoLockSettings):
        yield _Unlocked(trio.current_time())
    else:
        raise NotImplementedError("PostgreSQL leadership is not available in this version")
