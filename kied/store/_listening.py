"""Who listened for callbacks when, and how callbacks have been doing: in SQL, once for both
database stores.

Listening spans live in ``kied_state`` (one row per instance, ``listening:<instance>``, the
value ``"<since> <until>"``), so no table of their own is needed. The statements use
``:name`` parameters and are turned into ``%(name)s`` for psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, LiteralString, TypeVar

from kied.store._base import CallbackHistory, Finish, ListeningSpan
from kied.store._common import PUT_STATE, check_limit, for_psycopg

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from kied.store._deliveries import Executes

__all__ = ["ListeningMethods", "ListeningSql", "history_of", "spans_of"]

_T = TypeVar("_T")

#: ``kied_state`` names of listening spans start with this
_PREFIX: Final = "listening:"
_SPANS: Final[LiteralString] = (
    "SELECT name, value FROM kied_state WHERE substr(name, 1, :length) = :prefix"
)
_DELETE: Final[LiteralString] = "DELETE FROM kied_state WHERE name = :name"
_LAST_CALLBACK: Final[LiteralString] = (
    "SELECT received_at FROM callback_inbox WHERE authenticated ORDER BY received_at DESC LIMIT 1"
)
_FINISHES: Final[LiteralString] = (
    "SELECT family, model, ended_by, created_at, ended_at FROM jobs"
    " WHERE ended_at IS NOT NULL AND ended_by IN ('callback', 'callback_confirmed', 'poll')"
    " ORDER BY ended_at DESC LIMIT :limit"
)


def _parse_span(name: str, value: str) -> ListeningSpan | None:
    try:
        since, until = (float(part) for part in value.split())
    except ValueError:
        return None  # not one of ours: ignored, and left alone
    return ListeningSpan(instance=name.removeprefix(_PREFIX), since=since, until=until)


def spans_of(
    rows: Iterable[tuple[str, str]], *, after: float
) -> tuple[list[ListeningSpan], list[str]]:
    """The spans that reach past ``after``, by ``since``; and the names of those that do not
    (to delete)."""
    kept: list[ListeningSpan] = []
    stale: list[str] = []
    for name, value in rows:
        span = _parse_span(name, value)
        if span is None:
            continue
        if span.until > after:
            kept.append(span)
        else:
            stale.append(name)
    kept.sort(key=lambda span: (span.since, span.until, span.instance))
    return kept, stale


def history_of(last: float | None, rows: Sequence[Sequence[Any]]) -> CallbackHistory:
    """A :class:`CallbackHistory` from the newest callback's time and finishes, newest first."""
    finishes = tuple(
        Finish(
            family=str(family),
            model=model,
            by="poll" if ended_by == "poll" else "callback",
            created_at=float(created_at),
            ended_at=float(ended_at),
        )
        for family, model, ended_by, created_at, ended_at in reversed(rows)
    )
    return CallbackHistory(last_callback_at=last, finishes=finishes)


class ListeningSql:
    """The statements of one dialect."""

    def __init__(self, *, psycopg: bool) -> None:
        def convert(sql: LiteralString) -> LiteralString:
            return for_psycopg(sql) if psycopg else sql

        self._put = convert(PUT_STATE)
        self._spans = convert(_SPANS)
        self._delete = convert(_DELETE)
        self._last_callback = convert(_LAST_CALLBACK)
        self._finishes = convert(_FINISHES)

    def heard(self, conn: Executes, instance: str, since: float, now: float) -> None:
        value = f"{since!r} {now!r}"
        conn.execute(self._put, {"name": _PREFIX + instance, "value": value})

    def spans(self, conn: Executes, after: float) -> list[ListeningSpan]:
        params = {"length": len(_PREFIX), "prefix": _PREFIX}
        rows = [(str(n), str(v)) for n, v in conn.execute(self._spans, params)]
        kept, stale = spans_of(rows, after=after)
        for name in stale:
            conn.execute(self._delete, {"name": name})
        return kept

    def history(self, conn: Executes, limit: int) -> CallbackHistory:
        row = conn.execute(self._last_callback, {}).fetchone()
        rows = list(conn.execute(self._finishes, {"limit": limit}))
        return history_of(None if row is None else float(row[0]), rows)


class ListeningMethods:
    """The :class:`~kied.store.JobStore` listening and history methods of a database store.

    A store mixes this in and says how it runs one read and one write transaction
    (:meth:`_db_read`, :meth:`_db_write`) and which dialect it speaks (``_listening``).
    """

    _listening: ListeningSql

    async def _db_read(self, operation: Callable[[Any], _T]) -> _T:
        raise NotImplementedError

    async def _db_write(self, operation: Callable[[Any], _T]) -> _T:
        raise NotImplementedError

    async def heard_listening(self, instance: str, *, since: float, now: float) -> None:
        sql = self._listening
        await self._db_write(lambda conn: sql.heard(conn, instance, since, now))

    async def listening_spans(self, *, after: float) -> list[ListeningSpan]:
        sql = self._listening
        return await self._db_write(lambda conn: sql.spans(conn, after))

    async def callback_history(self, *, limit: int) -> CallbackHistory:
        check_limit(limit)
        sql = self._listening
        return await self._db_read(lambda conn: sql.history(conn, limit))
