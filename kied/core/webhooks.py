"""Signed webhooks, as Standard Webhooks 1.0 defines them: signing, and when to try again.

Pure arithmetic and hashing; the delivery itself is :mod:`kied.webhooks`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from enum import StrEnum
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_SCHEDULE_S",
    "SECRET_PREFIX",
    "Verdict",
    "parse_secret",
    "retry_delay",
    "safe_url",
    "sign",
    "verdict",
]

SECRET_PREFIX: Final = "whsec_"
#: Standard Webhooks' schedule: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_SCHEDULE_S: Final = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
#: the most a ``Retry-After`` can push the next attempt out
_MAX_RETRY_AFTER_S: Final = 36000.0


def parse_secret(text: str) -> bytes:
    """The key in a ``whsec_…`` secret (base64 after the prefix).

    Raises:
        ValueError: not ``whsec_`` followed by base64 of at least 16 bytes.
    """
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX}")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes (24 base64 characters)")
    return key


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64 HMAC-SHA256>`` per key.

    What is signed is ``msg_id.timestamp.body``; several keys (a rotation) give several
    signatures, separated by spaces, and a receiver accepts any one it can verify.
    """
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


class Verdict(StrEnum):
    DELIVERED = "delivered"  # 2xx
    RETRY = "retry"  # anything else, 3xx included
    GONE = "gone"  # 410: the endpoint asks to be disabled


def verdict(status_code: int) -> Verdict:
    """What an endpoint's HTTP answer means for a delivery."""
    if 200 <= status_code < 300:
        return Verdict.DELIVERED
    if status_code == 410:
        return Verdict.GONE
    return Verdict.RETRY


def retry_delay(
    attempts: int,
    schedule_s: Sequence[float],
    *,
    jitter: float,
    retry_after_s: float | None = None,
) -> float | None:
    """Seconds until the next attempt after ``attempts`` failed ones; None: no more.

    Args:
        attempts: attempts made so far (1 after the first).
        schedule_s: the delay before each attempt, the first usually 0.
        jitter: in [0, 1); the delay is scaled by 0.9 to 1.1 with it.
        retry_after_s: the endpoint's ``Retry-After`` (429, 503): the next attempt is not
            sooner than that, nor later than 10 hours.
    """
    if attempts >= len(schedule_s):
        return None
    delay = schedule_s[attempts] * (0.9 + 0.2 * jitter)
    if retry_after_s is not None and retry_after_s > delay:
        delay = min(retry_after_s, _MAX_RETRY_AFTER_S)
    return delay


def safe_url(url: str) -> str:
    """An endpoint as logged and shown: no user or password, and its query (which may hold
    a secret) as ``?…``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
