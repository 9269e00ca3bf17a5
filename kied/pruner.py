"""The leader's pruner: deletes what is older than the retention settings, a little at a time.

Today it prunes the event log (``KIED_EVENT_RETENTION_DAYS``, 7 days by default). Each
batch is one short transaction, and batches are spaced out, so callbacks and pollers
never wait behind a long delete.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from kied.errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kied.store import JobStore

__all__ = ["run_pruner"]

logger = logging.getLogger(__name__)

#: rows deleted in one transaction
BATCH = 500
#: pause between two batches of one round
_BATCH_PAUSE_S = 0.05
#: pause between two rounds
ROUND_S = 600.0


async def run_pruner(
    store: JobStore,
    *,
    event_retention_s: float,
    now: Callable[[], float],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every :data:`ROUND_S`, delete events older than ``event_retention_s``, until cancelled.

    Args:
        store: where the events are.
        event_retention_s: how long an event is kept.
        now: the wall clock (Unix seconds).

    Cancellation: safe at any point; a batch is one transaction, done or not.
    Resource handling: holds nothing between batches.
    """
    task_status.started()
    while True:
        deleted = 0
        try:
            while True:
                count = await store.prune_events(before=now() - event_retention_s, limit=BATCH)
                deleted += count
                if count < BATCH:
                    break
                await trio.sleep(_BATCH_PAUSE_S)
        except StoreError as exc:
            logger.warning("[GEN] pruning events failed, trying again later: %s", exc)
        if deleted:
            logger.info(
                "[GEN] pruned %d event(s) older than %g days",
                deleted,
                event_retention_s / 86400,
                extra={"action": "events_pruned", "count": deleted},
            )
        await trio.sleep(ROUND_S)
