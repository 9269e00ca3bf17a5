"""Cross-instance wake-ups over PostgreSQL LISTEN/NOTIFY.

Every change of a job on a PostgreSQL store is announced on the ``kied_jobs`` channel
(the store sends ``pg_notify`` in the transaction that makes the change, so the note
goes out exactly when the change commits). Each instance listens on one dedicated
connection, read without a thread; the leader cancels or starts the right poller within
milliseconds, and a passive instance wakes its long-polling API requests.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final

import psycopg
import trio
from psycopg import pq

from kied._pgconn import connection_info

if TYPE_CHECKING:
    from collections.abc import Callable

    from psycopg.rows import TupleRow

__all__ = ["CHANNEL", "run_job_listener"]

logger = logging.getLogger(__name__)

CHANNEL: Final = "kied_jobs"
_RETRY_MAX_S: Final = 5.0
#: at most one line this often about a connection that stays lost
_QUIET_S: Final = 60.0


def _connect(url: str) -> psycopg.Connection[TupleRow]:
    conninfo = connection_info(url, application_name="kied-listener")
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute(f"LISTEN {CHANNEL}")
    return conn


async def run_job_listener(
    url: str,
    on_notify: Callable[[str], None],
    on_connected: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for job changes until cancelled, reconnecting whenever the connection drops.

    Args:
        url: the PostgreSQL database.
        on_notify: called with each notification's payload (a job id).
        on_connected: called after every (re)connection, once listening: notes sent
            while the connection was down are lost, so the caller rescans storage.
        task_status: started once the first connection listens (or failed once).

    Cancellation: stops at once; the connection is closed.
    """
    delay = 0.1
    logged_at = -math.inf
    started = False
    while True:
        conn: psycopg.Connection[TupleRow] | None = None
        try:
            conn = await trio.to_thread.run_sync(_connect, url)
            logger.info("[GEN] listening for job changes on %s", CHANNEL)
            delay = 0.1
            on_connected()
            if not started:
                task_status.started()
                started = True
            pgconn = conn.pgconn
            while True:
                await trio.lowlevel.wait_readable(pgconn.socket)
                pgconn.consume_input()  # raises OperationalError once the server is gone
                while (note := pgconn.notifies()) is not None:
                    on_notify(note.extra.decode("utf-8", "replace"))
                if pgconn.status != pq.ConnStatus.OK:
                    raise psycopg.OperationalError("the listening connection was closed")
        except psycopg.Error as exc:
            # Each step of the back-off is logged; at its cap, once a minute at most.
            if delay < _RETRY_MAX_S or trio.current_time() - logged_at >= _QUIET_S:
                logged_at = trio.current_time()
                logger.warning(
                    "[GEN] job change listener lost its connection (%s); reconnecting in %.1f s",
                    " ".join(str(exc).split()),
                    delay,
                )
        finally:
            if conn is not None and not conn.closed:
                conn.close()
        if not started:
            task_status.started()
            started = True
        await trio.sleep(delay)
        delay = min(delay * 2, _RETRY_MAX_S)
