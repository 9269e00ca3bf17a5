"""Which URLs and addresses result files may be downloaded from: pure rules, no I/O.

Result URLs come from callbacks, so a sender who knows the callback secret could point
kied at this machine, the local network or a cloud metadata service. kied downloads only
http(s), and only from global addresses, unless the host is allowed by name
(``KIED_ARCHIVE_ALLOW_HOSTS``, for the simulator and tests on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = ["REFUSAL_KINDS", "host_allowed", "refused_address", "refused_url"]

#: Cloud metadata services (AWS, GCP, Azure, ...: 169.254.169.254; AWS over IPv6).
_METADATA: Final = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)

#: Why a download is refused, as metric labels.
REFUSAL_KINDS: Final = (
    "scheme",
    "metadata",
    "loopback",
    "private",
    "link_local",
    "multicast",
    "unspecified",
    "reserved",
    "too_large",
    "redirects",
)


def refused_address(text: str) -> str | None:
    """Why kied may not connect to the IP address ``text``, or None when it may.

    IPv4-mapped (``::ffff:a.b.c.d``) and IPv4-compatible IPv6 addresses are judged as the
    IPv4 address they carry.
    """
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
        text.split("%", 1)[0]
    )
    if address in _METADATA:
        return "metadata"
    if isinstance(address, ipaddress.IPv6Address):
        carried = address.ipv4_mapped
        if carried is None and address.packed[:12] == bytes(12) and int(address) > 1:
            carried = ipaddress.IPv4Address(address.packed[12:])  # ::a.b.c.d
        if carried is None and address.sixtofour is not None:
            carried = address.sixtofour
        if carried is not None:
            return refused_address(str(carried))
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link_local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if address.is_reserved or not address.is_global:
        return "reserved"
    return None


def host_allowed(host: str, port: int, allowed: Collection[str]) -> bool:
    """Whether ``host`` (a name or an address) on ``port`` is allowed by name."""
    host = host.lower().strip("[]")
    return host in allowed or f"{host}:{port}" in allowed or f"[{host}]:{port}" in allowed


def refused_url(url: str) -> str | None:
    """Why ``url`` may not be downloaded before any connection (``scheme``), or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a port that is not a number raises ValueError
    except ValueError:
        return "scheme"
    if parts.scheme.lower() not in ("http", "https") or not host:
        return "scheme"
    return None
