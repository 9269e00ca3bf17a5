"""Leadership through a PostgreSQL session-level advisory lock, for several instances.

The lock lives on one dedicated connection, never a pooled one: it is session state. While
it is held, the connection is watched without a thread (``wait_readable`` on its socket:
a closed or killed session is noticed at once) and the lock is proven held at a short
interval, so that a silent network loss is noticed too.

No work may rely on exclusivity: when a leader's session dies, the next leader usually
holds the lock a few milliseconds before the old one notices. Every write stays a
compare-and-set.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, NoReturn

import psycopg
import trio
from psycopg import pq

from kied._backoff import Backoff
from kied._pgconn import connection_info
from kied.errors import LeadershipLostError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from psycopg.rows import TupleRow

    from kied.settings import PgLockSettings

__all__ = ["LOCK_KEY", "PgLeader", "open_pg_leadership"]

logger = logging.getLogger(__name__)

#: The advisory lock's key: b"kiedLEAD" as a positive bigint.
LOCK_KEY: Final = int.from_bytes(b"kiedLEAD", "big") & 0x7FFF_FFFF_FFFF_FFFF

_TRY_LOCK: Final = "SELECT pg_try_advisory_lock(%s)"
_STILL_HELD: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid = %s AND objid = %s AND objsubid = 1)"
)
_CONNECT_TIMEOUT_S: Final = 5
#: the longest wait between attempts to reach a server that cannot be reached
_UNREACHABLE_RETRY_MAX_S: Final = 5.0


def _connect(url: str) -> psycopg.Connection[TupleRow]:
    conninfo = connection_info(
        url, application_name="kied-leader", connect_timeout_s=_CONNECT_TIMEOUT_S
    )
    return psycopg.connect(conninfo, autocommit=True)


def _try_lock(conn: psycopg.Connection[TupleRow]) -> bool:
    row = conn.execute(_TRY_LOCK, (LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def _still_held(conn: psycopg.Connection[TupleRow]) -> bool:
    row = conn.execute(_STILL_HELD, (LOCK_KEY >> 32, LOCK_KEY & 0xFFFF_FFFF)).fetchone()
    return bool(row and row[0])


class PgLeader:
    """The held advisory lock."""

    def __init__(
        self, conn: psycopg.Connection[TupleRow], acquired_at: float, settings: PgLockSettings
    ) -> None:
        self._conn = conn
        self._acquired_at = acquired_at
        self._settings = settings

    @property
    def backend(self) -> str:
        return "postgres"

    @property
    def acquired_at(self) -> float:
        return self._acquired_at

    async def watch(self) -> NoReturn:
        """Raise ``LeadershipLostError`` when the lock's session ends or the lock is gone."""
        pgconn = self._conn.pgconn
        while True:
            with trio.move_on_after(self._settings.heartbeat_s):
                await trio.lowlevel.wait_readable(pgconn.socket)
                # The server spoke unasked: a notice, or the end of the session.
                try:
                    pgconn.consume_input()
                except psycopg.OperationalError as exc:
                    raise LeadershipLostError(f"the lock's connection was lost: {exc}") from exc
                if pgconn.status != pq.ConnStatus.OK:
                    raise LeadershipLostError("the lock's connection was closed")
                continue
            await self._prove_held()

    async def _prove_held(self) -> None:
        try:
            with trio.fail_after(self._settings.heartbeat_timeout_s):
                held = await trio.to_thread.run_sync(
                    _still_held, self._conn, abandon_on_cancel=True
                )
        except trio.TooSlowError as exc:
            raise LeadershipLostError("the lock's connection stopped answering") from exc
        except psycopg.Error as exc:
            raise LeadershipLostError(f"the lock's connection failed: {exc}") from exc
        if not held:
            raise LeadershipLostError("the advisory lock is no longer held")


@asynccontextmanager
async def open_pg_leadership(settings: PgLockSettings, url: str) -> AsyncIterator[PgLeader]:
    """Take the advisory lock, waiting as long as another instance holds it.

    Returns only once the lock is held. Attempts are repeated every ``settings.retry_s``
    on one dedicated connection, reconnecting when it fails.

    Cancellation: safe at any point; a lock taken is released on the way out.
    Resource handling: owns the dedicated connection; closing it on exit ends the
    session, which releases the lock at once, so a standby can take over.
    """
    conn: psycopg.Connection[TupleRow] | None = None
    limiter = trio.CapacityLimiter(1)
    try:
        waiting_logged = False
        # A server that cannot be reached is tried again less and less often, and logged
        # once per step: not four lines a second for as long as it is down.
        backoff = Backoff(settings.retry_s, _UNREACHABLE_RETRY_MAX_S)
        while True:
            delay = settings.retry_s
            try:
                if conn is None or conn.closed:
                    conn = await trio.to_thread.run_sync(_connect, url, limiter=limiter)
                    backoff.succeeded()
                if await trio.to_thread.run_sync(_try_lock, conn, limiter=limiter):
                    break
                if not waiting_logged:
                    logger.info("[LOCK] another instance leads; PASSIVE until its lock is free")
                    waiting_logged = True
            except psycopg.Error as exc:
                delay, log = backoff.failed()
                if log:
                    logger.warning(
                        "[LOCK] cannot reach PostgreSQL for the lock, retrying in %.1f s: %s",
                        delay,
                        " ".join(str(exc).split()),
                    )
                if conn is not None:
                    conn.close()
                    conn = None
            await trio.sleep(delay)
        yield PgLeader(conn, trio.current_time(), settings)
    finally:
        if conn is not None and not conn.closed:
            # Ends the session: the server releases the lock as the socket closes.
            conn.close()
