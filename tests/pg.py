"""PostgreSQL for tests: the server, a template database, a fresh database per test.

The server is the one the libpq ``PG*`` variables name; unset, host 127.0.0.1, port 5432,
user postgres (libpq reads ``PGPASSWORD``, ``PGSSLMODE`` and the rest itself). Each test
session migrates one template database, once, on first use; each test clones it with
``CREATE DATABASE ... TEMPLATE``, which costs a few tens of milliseconds, and drops its
databases afterwards. Names carry a random part, so test sessions running at once on one
server keep apart.

These tests never skip: a server that cannot be reached fails them, saying so. The
fixtures (``pg_server``, ``pg_databases``, ``pg_url``) are registered in
``tests/conftest.py``.

:class:`PgProxy` stands between a store and the server, to cut, refuse or stall its
connections.
"""

from __future__ import annotations

import os
import threading
import uuid
from contextlib import suppress
from typing import TYPE_CHECKING
from urllib.parse import quote

import psycopg
import pytest
import trio
from psycopg import sql

from kied.store._postgres import _migrate

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["PgDatabases", "PgProxy", "PgServer"]

#: Bound on reaching the server for administration (libpq's minimum is 2 s).
CONNECT_TIMEOUT_S = 3


class PgServer:
    """The PostgreSQL server tests use, and the template database they clone.

    Nothing connects until a database is asked for, so tests that use no PostgreSQL do
    not need a server.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.host = environ.get("PGHOST") or "127.0.0.1"
        self.port = int(environ.get("PGPORT") or "5432")
        self.user = environ.get("PGUSER") or "postgres"
        self.maintenance_db = "postgres"
        self._prefix = f"kied_{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._template: str | None = None
        self._unreachable: str | None = None

    def url(self, dbname: str, *, port: int | None = None, host: str | None = None) -> str:
        """A ``postgresql://`` URL for ``dbname``, optionally through another host/port."""
        host = host or self.host
        port = port or self.port
        user = quote(self.user, safe="")
        if host.startswith("/"):  # a socket directory
            return f"postgresql://{user}@/{dbname}?host={quote(host, safe='')}&port={port}"
        netloc = f"[{host}]" if ":" in host else host
        return f"postgresql://{user}@{netloc}:{port}/{dbname}"

    def connect(self, dbname: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to ``dbname`` (the maintenance database by default).

        Fails the test, with a message that says what to do, when the server cannot be
        reached.
        """
        if self._unreachable is not None:
            pytest.fail(self._unreachable, pytrace=False)
        try:
            return psycopg.connect(
                self.url(dbname or self.maintenance_db),
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
            )
        except psycopg.OperationalError as exc:
            if dbname is not None:
                raise
            self._unreachable = (
                f"PostgreSQL is not reachable at {self.host}:{self.port} as {self.user!r}"
                f" ({str(exc).strip()}). These tests need it: start the server, or point"
                " PGHOST, PGPORT and PGUSER at one."
            )
            pytest.fail(self._unreachable, pytrace=False)

    def template(self) -> str:
        """The name of the migrated template database, created on first use."""
        with self._lock:
            if self._template is None:
                name = f"{self._prefix}_template"
                with self.connect() as admin:
                    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                with self.connect(name) as conn:
                    _migrate(conn)
                self._template = name
            return self._template

    def create_database(self, *, empty: bool = False) -> str:
        """Create a database: a clone of the template, or ``empty`` (no kied schema)."""
        template = "template0" if empty else self.template()
        name = f"{self._prefix}_test_{uuid.uuid4().hex[:12]}"
        with self.connect() as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection still open to it."""
        with self.connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def close(self) -> None:
        """Drop the template, if this session made one."""
        with self._lock:
            template, self._template = self._template, None
        if template is not None and self._unreachable is None:
            with suppress(psycopg.Error):
                self.drop_database(template)


class PgDatabases:
    """The databases one test creates; all dropped when the test ends."""

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self.names: list[str] = []

    def new(self, *, empty: bool = False) -> str:
        """A URL to a new database: migrated (a template clone), or ``empty``.

        Blocks for a few tens of milliseconds; from trio, call it through
        ``trio.to_thread.run_sync``.
        """
        name = self.server.create_database(empty=empty)
        self.names.append(name)
        return self.server.url(name)

    def drop_all(self) -> None:
        names, self.names = self.names, []
        for name in names:
            self.server.drop_database(name)


class PgProxy:
    """A TCP proxy to the server, on 127.0.0.1, that a test can cut, stall or restart.

    Use :meth:`url` in place of the server's URL, start it with
    ``await nursery.start(proxy.run)``, and:

    - :meth:`cut` closes every connection and stops listening (connections are refused)
      until :meth:`run` is started again, on the same port;
    - :meth:`stall` stops forwarding bytes (the server seems to hang) until :meth:`flow`.
    """

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._flowing = trio.Event()
        self._flowing.set()

    def url(self, dbname: str) -> str:
        assert self.port, "start the proxy first"
        return self.server.url(dbname, host="127.0.0.1", port=self.port)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward connections until :meth:`cut` or cancelled."""
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._forward, listeners)
                task_status.started(self.port)

    def cut(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def stall(self) -> None:
        self._flowing = trio.Event()

    def flow(self) -> None:
        self._flowing.set()

    async def _forward(self, client: trio.SocketStream) -> None:
        async with client:
            if self.server.host.startswith("/"):
                path = f"{self.server.host}/.s.PGSQL.{self.server.port}"
                upstream: trio.abc.Stream = await trio.open_unix_socket(path)
            else:
                upstream = await trio.open_tcp_stream(self.server.host, self.server.port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.abc.Stream, sink: trio.abc.Stream, both: trio.CancelScope
    ) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                await self._flowing.wait()
                await sink.send_all(data)
        both.cancel()  # one side closed: close the other
