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
    *,
    database_url: str | None = None,
) -> AsyncIterator[Leader]:
    """Hold the configured leadership lock for the duration of the block.

    Returns only once the lock is held. See :func:`open_file_leadership` and
    :func:`kied.leadership._postgres.open_pg_leadership`.

    Args:
        settings: which lock.
        database_url: the PostgreSQL database holding the advisory lock (``postgres`` lock).
    """
    if isinstance(settings, FileLockSettings):
        async with open_file_leadership(settings) as leader:
            yield leader
    elif isinstance(settings, NoLockSettings):
        yield _Unlocked(trio.current_time())
    else:
        if database_url is None:
            raise ValueError("a PostgreSQL lock needs the database URL")
        # Imported only here: a SQLite deployment needs no PostgreSQL driver.
        from kied.leadership._postgres import open_pg_leadership

        async with open_pg_leadership(settings, database_url) as pg_leader:
            yield pg_leader
