"""Durable jobs and the callback inbox, behind one interface: :class:`JobStore`."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from kied.errors import ConfigError
from kied.settings import PostgresStoreSettings, SqliteStoreSettings
from kied.store._base import ArchiveMode as ArchiveMode
from kied.store._base import Attached as Attached
from kied.store._base import CallbackEffect as CallbackEffect
from kied.store._base import CallbackHistory as CallbackHistory
from kied.store._base import CallbackRecord as CallbackRecord
from kied.store._base import Delivery as Delivery
from kied.store._base import DeliveryAttempt as DeliveryAttempt
from kied.store._base import DeliveryState as DeliveryState
from kied.store._base import Event as Event
from kied.store._base import Finish as Finish
from kied.store._base import InboxEntry as InboxEntry
from kied.store._base import JobStore as JobStore
from kied.store._base import ListeningSpan as ListeningSpan
from kied.store._base import NewDelivery as NewDelivery
from kied.store._base import Prunable as Prunable
from kied.store._base import PruneKind as PruneKind
from kied.store._base import StoredCallback as StoredCallback
from kied.store._memory import MemoryStore as MemoryStore
from kied.store._sqlite import SqliteStore as SqliteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = [
    "ArchiveMode",
    "Attached",
    "CallbackEffect",
    "CallbackHistory",
    "CallbackRecord",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryState",
    "Event",
    "Finish",
    "InboxEntry",
    "JobStore",
    "ListeningSpan",
    "MemoryStore",
    "NewDelivery",
    "Prunable",
    "PruneKind",
    "SqliteStore",
    "StoredCallback",
    "open_store",
]


@asynccontextmanager
async def open_store(
    settings: SqliteStoreSettings | PostgresStoreSettings, *, cleanup_s: float = 2.0
) -> AsyncIterator[JobStore]:
    """Open the configured store, migrated and ready, for the length of the block.

    Args:
        settings: which backend, and where.
        cleanup_s: bound on closing the store when the block exits.

    Yields:
        The open store.

    Raises:
        ConfigError: PostgreSQL is configured but psycopg (the ``kied[postgres]`` extra)
            is not installed, or its URL cannot be parsed.
        StoreUnavailableError: the database cannot be reached, opened or migrated, or its
            schema is newer than this version of kied knows.

    Cancellation:
        Cancelling while the database opens takes effect once the open finishes. Closing
        on exit is shielded, and bounded by ``cleanup_s``.

    Resource handling:
        The store belongs to the block: it is closed when the block exits, however it
        exits, and must not be used after.
    """
    store: JobStore
    if isinstance(settings, PostgresStoreSettings):
        # psycopg is an optional extra: only a PostgreSQL store imports it.
        try:
            from kied.store._postgres import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                "KIED_DATABASE_URL",
                f"PostgreSQL needs the postgres extra (pip install 'kied[postgres]'): {exc}",
            ) from None
        store = await PostgresStore.connect(settings)
    else:
        store = await SqliteStore.connect(settings.path)
    try:
        yield store
    finally:
        with trio.move_on_after(cleanup_s, shield=True):
            await store.aclose()
