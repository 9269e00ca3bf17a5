"""The leader's pruner: deletes what is older than the retention settings, a little at a time.

What is kept, and for how long (each ``None``, set as ``0`` or ``never``, keeps it forever,
except events, which are always pruned):

- ended jobs, from their end: ``KIED_JOB_RETENTION_DAYS``, 30 days by default. An
  unfinished job is never deleted. Callbacks matched to a deleted job stay in the inbox
  (until their own retention), no longer matched.
- webhook deliveries and their attempts, from when they were made: the jobs' retention.
  A pending delivery is never deleted.
- the callback inbox, from arrival: ``KIED_INBOX_RETENTION_DAYS``, 14 days by default;
  a callback that came before its job and is still waiting for it goes too.
- the event log: ``KIED_EVENT_RETENTION_DAYS``, 7 days by default.
- webhook signatures seen (the replay cache): twice the signatures' 5-minute window;
  older ones are refused by their timestamp anyway.

Each batch is one short transaction of at most :data:`BATCH` rows, oldest first, and
batches are spaced out, so callbacks and pollers never wait behind a long delete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from kied.errors import StoreError
from kied.store import PruneKind

if TYPE_CHECKING:
    from collections.abc import Callable

    from kied.metrics import Metrics
    from kied.settings import Settings
    from kied.store import JobStore

__all__ = ["BATCH", "ROUND_S", "Retention", "prune_kind", "prune_now", "run_pruner"]

logger = logging.getLogger(__name__)

#: rows deleted in one transaction
BATCH = 500
#: pause between two batches of one round
BATCH_PAUSE_S = 0.05
#: pause between two rounds
ROUND_S = 600.0
#: the order of a round: jobs first, so that their rows in other tables age out after them
ORDER: Final = (
    PruneKind.JOBS,
    PruneKind.DELIVERIES,
    PruneKind.INBOX,
    PruneKind.EVENTS,
    PruneKind.SIGNATURES,
)

_DAY_S: Final = 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How long each kind is kept, in seconds; None: forever."""

    events_s: float | None = 7 * _DAY_S
    jobs_s: float | None = 30 * _DAY_S
    inbox_s: float | None = 14 * _DAY_S
    #: webhook signatures seen: a replay is refused by its timestamp's window after this
    signatures_s: float | None = 600.0

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        """The retention ``settings`` ask for."""
        return cls(
            events_s=settings.event_retention_s,
            jobs_s=settings.job_retention_s,
            inbox_s=settings.inbox_retention_s,
            signatures_s=2 * settings.webhook_max_skew_s,
        )

    def kept_s(self, kind: PruneKind) -> float | None:
        """How long ``kind`` is kept; webhook deliveries are kept as long as jobs."""
        if kind is PruneKind.EVENTS:
            return self.events_s
        if kind is PruneKind.INBOX:
            return self.inbox_s
        if kind is PruneKind.SIGNATURES:
            return self.signatures_s
        return self.jobs_s


async def prune_kind(
    store: JobStore, kind: PruneKind, *, before: float, pause_s: float = BATCH_PAUSE_S
) -> int:
    """Delete every row of ``kind`` older than ``before``, a batch at a time; how many.

    Cancellation: safe at any point; a batch is one transaction, done or not.
    """
    deleted = 0
    while True:
        if kind is PruneKind.JOBS:
            # The ids of the deleted jobs: what is kept for a job outside the store
            # (result files) is to be deleted with it, here.
            count = len(await store.prune_jobs(before=before, limit=BATCH))
        elif kind is PruneKind.DELIVERIES:
            count = await store.prune_deliveries(before=before, limit=BATCH)
        elif kind is PruneKind.INBOX:
            count = await store.prune_inbox(before=before, limit=BATCH)
        elif kind is PruneKind.SIGNATURES:
            count = await store.prune_signatures(before=before, limit=BATCH)
        else:
            count = await store.prune_events(before=before, limit=BATCH)
        deleted += count
        if count < BATCH:
            return deleted
        await trio.sleep(pause_s)


async def prune_now(
    store: JobStore, retention: Retention, *, now: float, pause_s: float = BATCH_PAUSE_S
) -> dict[PruneKind, int]:
    """One round: every kind kept for a limited time, pruned as of ``now``; how many of
    each (kinds kept forever are left out).

    Raises:
        StoreError: the store failed; what was deleted before stays deleted.
    """
    counts: dict[PruneKind, int] = {}
    for kind in ORDER:
        kept_s = retention.kept_s(kind)
        if kept_s is not None:
            counts[kind] = await prune_kind(store, kind, before=now - kept_s, pause_s=pause_s)
    return counts


async def run_pruner(
    store: JobStore,
    *,
    retention: Retention,
    now: Callable[[], float],
    metrics: Metrics | None = None,
    jobs_pruned: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A round at once, then every :data:`ROUND_S`, until cancelled.

    Args:
        store: where the rows are.
        retention: how long each kind is kept.
        now: the wall clock (Unix seconds).
        metrics: where ``kied_pruned_total{kind}`` is counted.
        jobs_pruned: called after a round that deleted jobs (their kept files are then
            listed in the store's archive trash, for the archiver).

    Cancellation: safe at any point; a batch is one transaction, done or not.
    Resource handling: holds nothing between batches.
    """
    task_status.started()
    while True:
        counts: dict[PruneKind, int] = {}
        try:
            for kind in ORDER:
                kept_s = retention.kept_s(kind)
                if kept_s is None:
                    continue
                counts[kind] = await prune_kind(store, kind, before=now() - kept_s)
                if metrics is not None:
                    metrics.pruned(kind.value, counts[kind])
                if kind is PruneKind.JOBS and counts[kind] and jobs_pruned is not None:
                    jobs_pruned()
        except StoreError as exc:
            logger.warning("[GEN] pruning failed, trying again later: %s", exc)
        logger.log(
            logging.INFO if any(counts.values()) else logging.DEBUG,
            "[GEN] pruned %s",
            ", ".join(f"{kind.value} {count}" for kind, count in counts.items()) or "nothing",
            extra={"action": "pruned", **{f"pruned_{k.value}": n for k, n in counts.items()}},
        )
        await trio.sleep(ROUND_S)
