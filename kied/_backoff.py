"""Capped exponential back-off for a connection that keeps failing, and a capped log rate.

A database that stays down for an hour should leave a handful of lines in the log, not
thousands: each failure is logged while the delay still grows, then at most once a
``quiet_s`` while it stays at its cap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """The delays before each retry: ``first_s``, doubling up to ``max_s``.

    Not thread-safe; one per retry loop.
    """

    def __init__(
        self,
        first_s: float,
        max_s: float,
        *,
        quiet_s: float = 60.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._quiet_s = quiet_s
        self._clock = clock
        self._delay = first_s
        self._logged_at: float | None = None

    def failed(self) -> tuple[float, bool]:
        """One more failure: the delay before the next try, and whether to log this one."""
        delay = self._delay
        now = self._clock()
        at_cap = delay >= self._max_s
        log = not at_cap or self._logged_at is None or now - self._logged_at >= self._quiet_s
        if log:
            self._logged_at = now
        self._delay = min(delay * 2, self._max_s)
        return delay, log

    def succeeded(self) -> None:
        """The connection works again: the next failure starts from ``first_s``."""
        self._delay = self._first_s
        self._logged_at = None
