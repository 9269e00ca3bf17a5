"""A sliding-window rate limiter on Trio's clock.

KIE counts requests per account over a sliding window (20 new tasks per 10 s; 10 Market
status queries per second) and drops what goes over with a 429 instead of queueing it. So the
client waits its turn here first, in one process-wide limiter per kind of request. A limiter
may keep several windows at once (status queries: KIE's 10 a second, and kied's own budget
over 10 s): a request passes when every one of them has room, at the moment it is sent, so
that no queue between two limiters can bunch requests up again.
"""

from __future__ import annotations

import math
from collections import deque

import trio

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``limit`` grants in any ``window_s`` seconds (and, for each ``(limit,
    window_s)`` in ``also``, at most that many in any such window); waiters are served first
    come, first served.

    A grant at time ``t`` frees its slot in a window at exactly ``t + window_s``. Memory holds
    one timestamp per slot.

    Args:
        limit: grants allowed per window, at least 1.
        window_s: the window's length in seconds, finite and > 0.
        also: more windows, each ``(limit, window_s)`` as above.

    Raises:
        ValueError: a limit or window is out of range.
    """

    def __init__(
        self, limit: int, window_s: float, *, also: tuple[tuple[int, float], ...] = ()
    ) -> None:
        for each_limit, each_window_s in ((limit, window_s), *also):
            if isinstance(each_limit, bool) or not isinstance(each_limit, int) or each_limit < 1:
                raise ValueError(f"limit must be an integer >= 1, got {each_limit!r}")
            if not (math.isfinite(each_window_s) and each_window_s > 0):
                raise ValueError(f"window_s must be finite and > 0, got {each_window_s!r}")
        self.limit = limit
        self.window_s = window_s
        # Per window: its limit, its length, and the Trio times of the grants still inside
        # it, oldest first (never more than its limit). The first is (limit, window_s).
        self._windows: list[tuple[int, float, deque[float]]] = [
            (each_limit, each_window_s, deque())
            for each_limit, each_window_s in ((limit, window_s), *also)
        ]
        # Only the task at the head of the queue looks at the windows; the others wait
        # their turn here, in arrival order.
        self._turn = trio.StrictFIFOLock()

    @property
    def _grants(self) -> deque[float]:
        """The grants inside the first window (``limit`` per ``window_s``)."""
        return self._windows[0][2]

    async def acquire(self) -> None:
        """Wait until every window has a free slot, and take one in each.

        Always a checkpoint, even when a slot is free at once.

        Cancellation:
            Safe to cancel while waiting: no slot is taken and the next waiter moves up.
            There is no deadline of its own; the caller's scope bounds the wait.

        Resource handling:
            A slot is not given back: it frees itself ``window_s`` after it was taken.
        """
        async with self._turn:
            free_at = max(
                (
                    grants[0] + window_s
                    for limit, window_s, grants in self._windows
                    if len(grants) >= limit
                ),
                default=-math.inf,
            )
            if free_at > trio.current_time():
                await trio.sleep_until(free_at)
            now = trio.current_time()
            for _, window_s, grants in self._windows:
                while grants and grants[0] + window_s <= now:
                    grants.popleft()
                grants.append(now)
