"""Webhook deliveries in SQL, once for both database stores.

The statements are written with ``:name`` parameters (SQLite's style) and turned into
``%(name)s`` for psycopg; everything else in them is SQL both servers read alike. Each
function runs inside the caller's transaction (SQLite) or write transaction (PostgreSQL)
on a DB-API connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, LiteralString, Protocol, TypeVar

from kied.core.jobs import JobId
from kied.store._base import Delivery, DeliveryAttempt, DeliveryState
from kied.store._common import for_psycopg

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from kied.store._base import NewDelivery

__all__ = ["DeliveryMethods", "DeliverySql", "Executes"]

_T = TypeVar("_T")

_CURSOR_NAME: Final = "webhooks.cursor"
_DISABLED_PREFIX: Final = "webhooks.disabled:"

_COLUMNS: Final[LiteralString] = (
    "id, event_id, event_cursor, job_id, type, endpoint, body, state, attempts,"
    " next_attempt_at, created_at, updated_at, last_status, last_error, delivered_at"
)
_INSERT: Final[LiteralString] = (
    "INSERT INTO webhook_deliveries (event_id, event_cursor, job_id, type, endpoint, body,"
    " state, attempts, next_attempt_at, created_at, updated_at)"
    " VALUES (:event_id, :event_cursor, :job_id, :type, :endpoint, :body, 'pending', 0,"
    " :created_at, :created_at, :created_at)"
    " ON CONFLICT (event_id, endpoint) DO NOTHING"
)
_SET_CURSOR: Final[LiteralString] = (
    "INSERT INTO kied_state (name, value) VALUES (:name, :value)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
    " WHERE CAST(kied_state.value AS BIGINT) < CAST(excluded.value AS BIGINT)"
)
_GET_STATE: Final[LiteralString] = "SELECT value FROM kied_state WHERE name = :name"
_STATE_LIKE: Final[LiteralString] = (
    "SELECT name, value FROM kied_state WHERE substr(name, 1, :length) = :prefix"
)
_PUT_STATE: Final[LiteralString] = (
    "INSERT INTO kied_state (name, value) VALUES (:name, :value)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
_DELETE_STATE: Final[LiteralString] = "DELETE FROM kied_state WHERE name = :name"
# At most :per_endpoint of each endpoint's, so that a dead endpoint's backlog never hides
# another endpoint's due deliveries.
_DUE: Final[LiteralString] = (
    "SELECT " + _COLUMNS + " FROM (SELECT " + _COLUMNS + ", ROW_NUMBER() OVER"
    " (PARTITION BY endpoint ORDER BY next_attempt_at, id) AS place FROM webhook_deliveries"
    " WHERE state = 'pending' AND next_attempt_at <= :now) AS due"
    " WHERE place <= :per_endpoint ORDER BY next_attempt_at, id LIMIT :limit"
)
_NEXT_DUE: Final[LiteralString] = (
    "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'"
)
_RECORD_ATTEMPT: Final[LiteralString] = (
    "INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, duration_s, error)"
    " VALUES (:delivery_id, :attempted_at, :status_code, :duration_s, :error)"
)
# Only a pending delivery moves on: a redelivery or a disabled endpoint wins over an
# attempt that was in flight meanwhile.
_AFTER_ATTEMPT: Final[LiteralString] = (
    "UPDATE webhook_deliveries SET attempts = attempts + 1, state = :state,"
    " next_attempt_at = :next_attempt_at, updated_at = :attempted_at,"
    " last_status = :status_code, last_error = :error,"
    " delivered_at = CASE WHEN CAST(:state AS TEXT) = 'delivered' THEN :attempted_at"
    " ELSE delivered_at END"
    " WHERE id = :delivery_id AND state = 'pending'"
)
_LIST: Final[LiteralString] = (
    "SELECT " + _COLUMNS + " FROM webhook_deliveries"
    " WHERE (CAST(:state AS TEXT) IS NULL OR state = :state)"
    " AND (CAST(:event_id AS TEXT) IS NULL OR event_id = :event_id)"
    " AND (CAST(:since AS DOUBLE PRECISION) IS NULL OR created_at >= :since)"
    " ORDER BY id DESC LIMIT :limit"
)
_ATTEMPTS: Final[LiteralString] = (
    "SELECT delivery_id, attempted_at, status_code, duration_s, error FROM webhook_attempts"
    " WHERE delivery_id = :delivery_id ORDER BY id"
)
_REDELIVER_CHOSEN: Final[LiteralString] = (
    " FROM webhook_deliveries"
    " WHERE (CAST(:event_id AS TEXT) IS NOT NULL AND event_id = :event_id)"
    " OR (CAST(:failed_since AS DOUBLE PRECISION) IS NOT NULL AND state = 'failed'"
    " AND created_at >= :failed_since)"
)
_REDELIVER_ENDPOINTS: Final[LiteralString] = "SELECT DISTINCT endpoint" + _REDELIVER_CHOSEN
_REDELIVER: Final[LiteralString] = (
    "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = :now,"
    " updated_at = :now WHERE id IN (SELECT id" + _REDELIVER_CHOSEN + ")"
)
_FAIL_ENDPOINT: Final[LiteralString] = (
    "UPDATE webhook_deliveries SET state = 'failed', next_attempt_at = NULL,"
    " updated_at = :now, last_error = :reason"
    " WHERE endpoint = :endpoint AND state = 'pending'"
)


class Executes(Protocol):
    """The part of a DB-API connection used here (sqlite3 and psycopg alike)."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...


def _delivery(row: Sequence[Any]) -> Delivery:
    (
        delivery_id,
        event_id,
        event_cursor,
        job_id,
        kind,
        endpoint,
        body,
        state,
        attempts,
        next_attempt_at,
        created_at,
        updated_at,
        last_status,
        last_error,
        delivered_at,
    ) = row
    return Delivery(
        id=delivery_id,
        event_id=event_id,
        event_cursor=event_cursor,
        job_id=JobId(job_id),
        type=kind,
        endpoint=endpoint,
        body=body,
        state=DeliveryState(state),
        attempts=attempts,
        next_attempt_at=next_attempt_at,
        created_at=created_at,
        updated_at=updated_at,
        last_status=last_status,
        last_error=last_error,
        delivered_at=delivered_at,
    )


class DeliverySql:
    """The delivery statements of one dialect, and what runs them."""

    def __init__(self, *, psycopg: bool) -> None:
        def convert(sql: LiteralString) -> LiteralString:
            return for_psycopg(sql) if psycopg else sql

        self._insert = convert(_INSERT)
        self._set_cursor = convert(_SET_CURSOR)
        self._get_state = convert(_GET_STATE)
        self._state_like = convert(_STATE_LIKE)
        self._put_state = convert(_PUT_STATE)
        self._delete_state = convert(_DELETE_STATE)
        self._due = convert(_DUE)
        self._next_due = convert(_NEXT_DUE)
        self._record_attempt = convert(_RECORD_ATTEMPT)
        self._after_attempt = convert(_AFTER_ATTEMPT)
        self._list = convert(_LIST)
        self._attempts = convert(_ATTEMPTS)
        self._redeliver_endpoints = convert(_REDELIVER_ENDPOINTS)
        self._redeliver = convert(_REDELIVER)
        self._fail_endpoint = convert(_FAIL_ENDPOINT)

    def enqueue(self, conn: Executes, deliveries: Sequence[NewDelivery], cursor: int) -> int:
        added = 0
        for d in deliveries:
            params = {
                "event_id": d.event_id,
                "event_cursor": d.event_cursor,
                "job_id": d.job_id,
                "type": d.type,
                "endpoint": d.endpoint,
                "body": d.body,
                "created_at": d.created_at,
            }
            added += max(0, conn.execute(self._insert, params).rowcount)
        conn.execute(self._set_cursor, {"name": _CURSOR_NAME, "value": str(cursor)})
        return added

    def cursor(self, conn: Executes) -> int:
        row = conn.execute(self._get_state, {"name": _CURSOR_NAME}).fetchone()
        return 0 if row is None else int(row[0])

    def due(self, conn: Executes, now: float, limit: int, per_endpoint: int) -> list[Delivery]:
        params = {"now": now, "limit": limit, "per_endpoint": per_endpoint}
        return [_delivery(r) for r in conn.execute(self._due, params)]

    def next_due(self, conn: Executes) -> float | None:
        row = conn.execute(self._next_due, {}).fetchone()
        return None if row is None else row[0]

    def record_attempt(
        self,
        conn: Executes,
        attempt: DeliveryAttempt,
        state: DeliveryState,
        next_attempt_at: float | None,
    ) -> None:
        params: dict[str, Any] = {
            "delivery_id": attempt.delivery_id,
            "attempted_at": attempt.attempted_at,
            "status_code": attempt.status_code,
            "duration_s": attempt.duration_s,
            "error": attempt.error,
        }
        conn.execute(self._record_attempt, params)
        params.update(state=state.value, next_attempt_at=next_attempt_at)
        conn.execute(self._after_attempt, params)

    def list_deliveries(
        self,
        conn: Executes,
        *,
        state: DeliveryState | None,
        event_id: str | None,
        since: float | None,
        limit: int,
    ) -> list[Delivery]:
        params = {
            "state": None if state is None else state.value,
            "event_id": event_id,
            "since": since,
            "limit": limit,
        }
        return [_delivery(r) for r in conn.execute(self._list, params)]

    def attempts(self, conn: Executes, delivery_id: int) -> list[DeliveryAttempt]:
        rows: Iterable[Sequence[Any]] = conn.execute(self._attempts, {"delivery_id": delivery_id})
        return [
            DeliveryAttempt(
                delivery_id=r[0], attempted_at=r[1], status_code=r[2], duration_s=r[3], error=r[4]
            )
            for r in rows
        ]

    def redeliver(
        self, conn: Executes, *, event_id: str | None, failed_since: float | None, now: float
    ) -> int:
        chosen: Mapping[str, Any] = {"event_id": event_id, "failed_since": failed_since}
        for (endpoint,) in conn.execute(self._redeliver_endpoints, chosen).fetchall():
            conn.execute(self._delete_state, {"name": _DISABLED_PREFIX + endpoint})
        return int(conn.execute(self._redeliver, {**chosen, "now": now}).rowcount)

    def disable(self, conn: Executes, endpoint: str, reason: str, now: float) -> int:
        conn.execute(self._put_state, {"name": _DISABLED_PREFIX + endpoint, "value": reason})
        params = {"endpoint": endpoint, "reason": reason, "now": now}
        return int(conn.execute(self._fail_endpoint, params).rowcount)

    def disabled(self, conn: Executes) -> dict[str, str]:
        params = {"prefix": _DISABLED_PREFIX, "length": len(_DISABLED_PREFIX)}
        return {
            name[len(_DISABLED_PREFIX) :]: value
            for name, value in conn.execute(self._state_like, params).fetchall()
        }


class DeliveryMethods:
    """The :class:`~kied.store.JobStore` delivery methods of a database store.

    A store mixes this in and says how it runs one read and one write transaction
    (:meth:`_db_read`, :meth:`_db_write`) and which dialect it speaks (``_deliveries``).
    """

    _deliveries: DeliverySql

    async def _db_read(self, operation: Callable[[Any], _T]) -> _T:
        raise NotImplementedError

    async def _db_write(self, operation: Callable[[Any], _T]) -> _T:
        raise NotImplementedError

    async def enqueue_deliveries(self, deliveries: Sequence[NewDelivery], *, cursor: int) -> int:
        sql = self._deliveries
        return await self._db_write(lambda conn: sql.enqueue(conn, deliveries, cursor))

    async def webhook_cursor(self) -> int:
        return await self._db_read(self._deliveries.cursor)

    async def due_deliveries(
        self, *, now: float, limit: int, per_endpoint: int = 100
    ) -> list[Delivery]:
        sql = self._deliveries
        return await self._db_read(lambda conn: sql.due(conn, now, limit, per_endpoint))

    async def next_delivery_at(self) -> float | None:
        return await self._db_read(self._deliveries.next_due)

    async def record_attempt(
        self, attempt: DeliveryAttempt, *, state: DeliveryState, next_attempt_at: float | None
    ) -> None:
        sql = self._deliveries
        await self._db_write(lambda conn: sql.record_attempt(conn, attempt, state, next_attempt_at))

    async def list_deliveries(
        self,
        *,
        state: DeliveryState | None = None,
        event_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        sql = self._deliveries
        return await self._db_read(
            lambda conn: sql.list_deliveries(
                conn, state=state, event_id=event_id, since=since, limit=limit
            )
        )

    async def list_attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        sql = self._deliveries
        return await self._db_read(lambda conn: sql.attempts(conn, delivery_id))

    async def redeliver(
        self, *, event_id: str | None = None, failed_since: float | None = None, now: float
    ) -> int:
        sql = self._deliveries
        return await self._db_write(
            lambda conn: sql.redeliver(conn, event_id=event_id, failed_since=failed_since, now=now)
        )

    async def disable_endpoint(self, endpoint: str, *, reason: str, now: float) -> int:
        sql = self._deliveries
        return await self._db_write(lambda conn: sql.disable(conn, endpoint, reason, now))

    async def disabled_endpoints(self) -> dict[str, str]:
        return await self._db_read(self._deliveries.disabled)
