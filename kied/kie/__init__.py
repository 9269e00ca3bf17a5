"""KIE: the client kied talks to KIE with, and kied's own KIE simulator."""

from __future__ import annotations

__all__: list[str] = []
