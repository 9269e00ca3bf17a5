"""Instants as the API and the command line take them: epoch seconds or ISO 8601.

Shared by :mod:`kied.web` and :mod:`kied.client_cli`, so that ``--since`` means on the
command line what ``?since=`` means to the daemon.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = ["parse_instant"]


def parse_instant(text: str) -> float:
    """Epoch seconds from ``text``: epoch seconds (``1767225600``) or ISO 8601
    (``2026-01-01T00:00:00Z``). A time that names no offset is UTC, as every time kied
    shows is.

    Raises:
        ValueError: neither of the two, or not a finite time.
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("must be epoch seconds or an ISO 8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(value):
        raise ValueError("must be a finite number of epoch seconds")
    return value
