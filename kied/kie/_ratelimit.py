"""A sliding-window rate limiter on Trio's clock.

KIE counts requests per account over a sliding window (20 new tasks per 10 s; 10 Market
status queries per second) and drops what goes over with a 429 instead of queueing it. So the
client waits its turn here first, in one process-wide limiter per kind of request.
"""

from __future__ import annotations

import math
from collections import deque

import trio

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``limit`` grants in any ``window_s`` seconds; waiters are served first come,
    first served.

    A grant at time ``t`` frees its slot at exactly ``t + window_s``. Memory holds one
    timestamp per slot.

    Args:
        limit: grants allowed per window, at least 1.
        window_s: the window's length in seconds, finite and > 0.

    Raises:
        ValueError: ``limit`` or ``window_s`` is out of range.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be finite and > 0, got {window_s!r}")
        self.limit = limit
        self.window_s = window_s
        # Trio times of the grants still inside the window, oldest first; never more than limit.
        self._grants: deque[float] = deque()
        # Only the task at the head of the queue looks at the window; the others wait their
        # turn here, in arrival order.
        self._turn = trio.StrictFIFOLock()

    async def acquire(self) -> None:
        """Wait until a slot is free, and take it.

        Always a checkpoint, even when a slot is free at once.

        Cancellation:
            Safe to cancel while waiting: no slot is taken and the next waiter moves up.
            There is no deadline of its own; the caller's scope bounds the wait.

        Resource handling:
            A slot is not given back: it frees itself ``window_s`` after it was taken.
        """
        async with self._turn:
            grants = self._grants
            if len(grants) >= self.limit:
                await trio.sleep_until(grants[0] + self.window_s)
            now = trio.current_time()
            while grants and grants[0] + self.window_s <= now:
                grants.popleft()
            grants.append(now)
