"""Who listened for KIE's callbacks when, and the stretch of time nobody did.

KIE sends each callback once (more or less): one sent while no instance of kied listens (a
deploy, a crash, a restart on Render) is lost, and only a status query can tell what it said.
So every instance, PASSIVE or ACTIVE, records in storage the span of time it has listened
(:func:`run_heartbeat`: since it opened its port, until now, every :data:`HEARTBEAT_S`).
A new leader puts those spans together (:func:`unheard_before`): if they, and its own since
it started listening, cover the time up to now, every callback was heard (a deploy where the
new instance starts before the old one stops; a PASSIVE instance taking over from a leader
that crashed); otherwise the newest gap ends when listening began again, and every job
created before that may have ended in it. Those jobs are queried first; the others keep their
schedule.

The heartbeat errs towards querying: an instance counts as listening only up to its last
recorded heartbeat, so a crash is a gap from at most :data:`HEARTBEAT_S` before it.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Final

import trio

from kied.errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from kied.store import JobStore, ListeningSpan

__all__ = ["HEARTBEAT_S", "SPANS_KEPT_S", "record_listening", "run_heartbeat", "unheard_before"]

logger = logging.getLogger(__name__)

#: how often an instance records that it still listens
HEARTBEAT_S: Final = 5.0
#: spans that ended longer ago than this are forgotten (no job lives that long unfinished
#: without reaching its deadline)
SPANS_KEPT_S: Final = 7 * 86400.0


def unheard_before(
    spans: Iterable[ListeningSpan], *, instance: str, since: float, now: float
) -> float | None:
    """When listening last began again after a stretch in which no instance listened.

    Args:
        spans: the instances' listening spans, as stored (this instance's may be among them).
        instance: this instance's name; its stored span is replaced by ``[since, now]``.
        since: when this instance began listening (wall clock).
        now: now (wall clock).

    Returns:
        The end of the newest gap in the spans before ``now``: jobs created before it may
        have ended while nobody listened. None when no such gap exists. With no other
        instance's span stored (the first start, or a database from before spans were
        kept), nothing is known before this instance began listening: ``since``.
    """
    others = [(s.since, s.until) for s in spans if s.instance != instance]
    if not others:
        return since if since < now else None
    gap_end: float | None = None
    reached = -math.inf
    for start, until in sorted([*others, (since, now)]):
        if start > reached > -math.inf:
            gap_end = start
        reached = max(reached, until)
    return gap_end if gap_end is not None and gap_end < now else None


async def run_heartbeat(
    store: Callable[[], Awaitable[JobStore]],
    *,
    instance: str,
    since: float,
    now: Callable[[], float],
) -> None:
    """Record, every :data:`HEARTBEAT_S`, that this instance listens; until cancelled.

    Cancellation: cancelling it stops the heartbeats; the span ends at the last one.

    Resource handling: each write is bounded by the heartbeat interval; a store that fails
    or is slow only delays the next one (it is logged at DEBUG).
    """
    while True:
        await record_listening(store, instance=instance, since=since, now=now, within_s=HEARTBEAT_S)
        await trio.sleep(HEARTBEAT_S)


async def record_listening(
    store: Callable[[], Awaitable[JobStore]],
    *,
    instance: str,
    since: float,
    now: Callable[[], float],
    within_s: float,
) -> None:
    """Record once that ``instance`` has listened from ``since`` until ``now()``, giving up
    after ``within_s``; a failure leaves the span where it was (logged at DEBUG), which errs
    towards querying."""
    with trio.move_on_after(within_s):
        try:
            opened = await store()
            await opened.heard_listening(instance, since=since, now=now())
        except StoreError as exc:
            logger.debug("[GEN] cannot record that this instance listens: %s", exc)
