"""The pure core: no I/O, no Trio. The callback parser, the job state table, KIE's family
maps, the poll schedule, webhook signing and the application's views live in its modules.

The JSON value types and the tolerant readers the adapters share are re-exported here.
"""

from __future__ import annotations

from kied.core._extract import as_int as as_int
from kied.core._extract import clean_id as clean_id
from kied.core._extract import loads as loads
from kied.core._json import JsonObject as JsonObject
from kied.core._json import JsonValue as JsonValue

__all__ = ["JsonObject", "JsonValue", "as_int", "clean_id", "loads"]
