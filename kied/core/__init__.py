"""The pure core: no I/O, no Trio. The callback parser, the job state table, KIE's family
maps and the poll schedule live in its modules."""

from __future__ import annotations

__all__: list[str] = []
