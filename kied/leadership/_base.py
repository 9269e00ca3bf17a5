"""What a leadership lock hands the daemon while it is held."""

from __future__ import annotations

from typing import NoReturn, Protocol

__all__ = ["Leader"]


class Leader(Protocol):
    """A held leadership lock."""

    @property
    def backend(self) -> str:
        """``file``, ``postgres`` or ``none``."""
        ...

    @property
    def acquired_at(self) -> float:
        """``trio.current_time()`` when the lock was won."""
        ...

    async def watch(self) -> NoReturn:
        """Run while the lock is held; raise ``LeadershipLostError`` the moment it is not.

        Cancellation: cancelling it stops the watch; the lock itself is released by the
        ``open_*`` context manager that produced this leader.
        """
        ...
