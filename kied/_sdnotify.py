"""systemd's service notification protocol (``sd_notify``), in the standard library.

systemd hands a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET``: a path, or ``@name`` for the abstract namespace. Each notification is
one datagram of ``KEY=VALUE`` lines (``READY=1``, ``STATUS=…``, ``WATCHDOG=1``,
``STOPPING=1``). Outside systemd the address is ``None`` and every call does nothing.
"""

from __future__ import annotations

import logging
import socket

import trio

__all__ = ["SystemdNotifier", "run_watchdog"]

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends notifications to systemd; does nothing when ``address`` is ``None``.

    A failed send is logged once, as a warning, and later failures at debug level: a
    supervisor that cannot be told anything is worth one loud line, not one a second.
    Sending never blocks: the socket is non-blocking, and a full queue is a failed send.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._failed_before = False

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one notification; whether it was sent."""
        if self.address is None:
            return False
        # Abstract socket names start with a NUL byte; systemd writes it as "@".
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.connect(target)
                sock.sendall("\n".join(lines).encode())
        except OSError as exc:
            level = logging.DEBUG if self._failed_before else logging.WARNING
            self._failed_before = True
            logger.log(
                level,
                "[GEN] cannot notify systemd at %s: %s",
                self.address,
                exc,
                extra={"action": "sd_notify_failed"},
            )
            return False
        return True


async def run_watchdog(
    notifier: SystemdNotifier,
    interval_s: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` until cancelled.

    The pings come from the event loop itself, so a loop that stops turning stops them,
    and systemd restarts the service once its ``WatchdogSec=`` passes.

    Args:
        notifier: where to send the pings.
        interval_s: seconds between pings; half of systemd's watchdog timeout.

    Cancellation: stops pinging at once.
    Resource handling: opens one short-lived socket per ping.
    """
    task_status.started()
    next_at = trio.current_time()
    while True:
        notifier.notify("WATCHDOG=1")
        # On schedule without drift; after a stall, one ping at once rather than a burst.
        next_at = max(next_at + interval_s, trio.current_time())
        await trio.sleep_until(next_at)
