"""How kied connects to PostgreSQL: one set of connection defaults for every connection.

The store's pool, the leader's lock session and the change listener all take the user's URL
and add kied's defaults for whatever the URL does not set itself: TCP keepalives and a user
timeout (a silently lost server is noticed), a connect timeout, and an application name that
tells them apart in ``pg_stat_activity``.
"""

from __future__ import annotations

import math
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kied.errors import ConfigError

__all__ = ["CONNECTION_DEFAULTS", "connection_info"]

CONNECTION_DEFAULTS: Final = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",  # milliseconds
}


def connection_info(url: str, *, application_name: str, connect_timeout_s: float = 5.0) -> str:
    """The user's URL, with kied's connection defaults for whatever it does not set.

    Raises:
        ConfigError: ``url`` is not a PostgreSQL connection URL.
    """
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError("KIED_DATABASE_URL", f"not a valid PostgreSQL URL: {exc}") from None
    defaults = {
        **CONNECTION_DEFAULTS,
        "application_name": application_name,
        # libpq takes whole seconds, and no fewer than 2.
        "connect_timeout": str(max(2, math.ceil(connect_timeout_s))),
    }
    return make_conninfo(url, **{k: v for k, v in defaults.items() if k not in given})
