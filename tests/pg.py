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

That server belongs to others too, so no test stops or restarts it. A test that must do so
takes :class:`PgCluster` (fixture ``pg_cluster``): a cluster of its own, in a temporary
directory, on a free port of 127.0.0.1, removed when the test ends. Each is a copy of one
data directory made by ``initdb`` once per session (:class:`PgClusterTemplate`): the copy
costs about a third of an ``initdb`` (0.1-0.2 s against 0.5 s on an idle machine). These
never skip either: without PostgreSQL's server binaries they fail, saying what to install.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

import psycopg
import pytest
import trio
from psycopg import sql

from kied.store._postgres import _migrate
from tests.procs import free_port

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "PgCluster",
    "PgClusterError",
    "PgClusterTemplate",
    "PgDatabases",
    "PgProxy",
    "PgServer",
    "find_pg_bindir",
]

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


# ---------------------------------------------------------------- a cluster of the test's own

#: Bound on ``pg_ctl`` waiting for the server to start or stop (its ``-t``).
PG_CTL_TIMEOUT_S = 30

#: The unprivileged user that runs the server when the tests run as root.
_SERVER_USER = "postgres"

# Nothing in a test cluster has to survive a crash: trade durability for speed.
_CLUSTER_CONF = """
# kied tests
listen_addresses = '127.0.0.1'
max_connections = 100
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
"""


class PgClusterError(Exception):
    """``initdb`` or ``pg_ctl`` failed; the message carries their output and the server log."""


@functools.cache
def find_pg_bindir() -> Path:
    """The directory of the newest PostgreSQL server binaries (``initdb``, ``pg_ctl``).

    Looks in ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu), then in ``pg_config --bindir``.
    Fails the test, saying what to install, when there are none.
    """

    def usable(bindir: Path) -> bool:
        return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl"))

    def version(bindir: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in bindir.parent.name.split("."))
        except ValueError:
            return ()

    installed = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if usable(d)]
    if installed:
        return max(installed, key=version)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and usable(Path(out)):
                return Path(out)
    pytest.fail(
        "PostgreSQL's server binaries (initdb, pg_ctl) are in neither /usr/lib/postgresql/*/bin"
        " nor `pg_config --bindir`. This test runs a PostgreSQL server of its own: install"
        " them (Debian, Ubuntu: apt-get install postgresql).",
        pytrace=False,
    )


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None for this process's user, the postgres user under root."""
    # initdb and postgres refuse to run as root.
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SERVER_USER)
    except KeyError:
        pytest.fail(
            f"The tests run as root, and PostgreSQL's server refuses to: it needs a user"
            f" {_SERVER_USER!r} to run as, and there is none.",
            pytrace=False,
        )


def _make_directory() -> Path:
    """A new temporary directory that the server's user owns."""
    directory = Path(tempfile.mkdtemp(prefix="kied-pg-"))
    owner = _server_user()
    if owner is not None:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    return directory


def _run(argv: list[str], *, cwd: Path, log: Path | None = None) -> str:
    """Run a server binary as the server's user; its output, or :class:`PgClusterError`."""
    if _server_user() is not None:
        argv = ["runuser", "-u", _SERVER_USER, "--", *argv]
    # The binaries find their way by PGDATA, PGPORT and the like: only the arguments count.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PG_CTL_TIMEOUT_S + 30,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgClusterError(f"{' '.join(argv)} did not finish{_log_tail(log)}") from exc
    if done.returncode != 0:
        raise PgClusterError(
            f"{' '.join(argv)} failed with status {done.returncode}:\n"
            f"{done.stdout}{done.stderr}{_log_tail(log)}"
        )
    return done.stdout


def _log_tail(log: Path | None, *, since: int = 0, lines: int = 20) -> str:
    if log is None:
        return ""
    try:
        with log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\nserver log ({log}):\n{tail}" if tail else ""


def _initdb(bindir: Path, datadir: Path) -> None:
    _run(
        [
            str(bindir / "initdb"),
            "--pgdata",
            str(datadir),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--no-sync",
            "--locale",
            "C",
            "--encoding",
            "UTF8",
        ],
        cwd=datadir.parent,
    )
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write(_CLUSTER_CONF)


class PgClusterTemplate:
    """A data directory made by ``initdb`` once, for each :class:`PgCluster` to copy.

    Never started, so a copy begins as a cleanly shut down cluster.
    """

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_pg_bindir()
        self.directory = _make_directory()
        self.datadir = self.directory / "data"
        try:
            _initdb(self.bindir, self.datadir)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class PgCluster:
    """A PostgreSQL cluster of the test's own, which it may stop, restart or break.

    Lives in a temporary directory (``data/`` the cluster, ``server.log`` its log, and the
    Unix socket), listens on ``host``:``port`` (127.0.0.1 and a free port, kept across
    restarts), and trusts every connection as user ``postgres``. Made by copying
    ``template``, or by ``initdb`` when there is none. It is not started: call :meth:`start`,
    and :meth:`close` when done.

    Its methods block (``pg_ctl`` waits for the server); from trio, call them through
    ``trio.to_thread.run_sync``.
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, template: PgClusterTemplate | None = None) -> None:
        self.bindir = template.bindir if template is not None else find_pg_bindir()
        self.directory = _make_directory()
        self.datadir = self.directory / "data"
        self.log = self.directory / "server.log"
        self.port = free_port()
        self._started = False
        try:
            if template is None:
                _initdb(self.bindir, self.datadir)
            else:
                # -a keeps modes and, under root, the postgres user's ownership.
                subprocess.run(
                    ["cp", "-a", str(template.datadir), str(self.datadir)], check=True, timeout=60
                )
            self._configure()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def url(self, dbname: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``dbname`` on this cluster."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to ``dbname``."""
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)

    def create_database(self, name: str, *, empty: bool = False) -> str:
        """Create database ``name``, migrated unless ``empty``; its URL."""
        with self.connect() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if not empty:
            with self.connect(name) as conn:
                _migrate(conn)
        return self.url(name)

    @property
    def running(self) -> bool:
        """Whether the server runs (``pg_ctl status``)."""
        try:
            self._pg_ctl("status")
        except PgClusterError:
            return False
        return True

    def start(self) -> None:
        """Start the server; return once it accepts connections."""
        for _ in range(3):
            since = self._log_size()
            try:
                self._pg_ctl("start", "-w", "-t", str(PG_CTL_TIMEOUT_S), "-l", str(self.log))
            except PgClusterError:
                # free_port() cannot hold the port: someone may have taken it since. Before
                # the first start nobody has its URL yet, so another port will do.
                tail = _log_tail(self.log, since=since)
                if self._started or "Address already in use" not in tail:
                    raise
                self.port = free_port()
                self._configure()
            else:
                self._started = True
                return
        raise PgClusterError(f"no free port for the server{_log_tail(self.log)}")

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server, in PostgreSQL's shutdown ``mode``; return once it is down."""
        self._pg_ctl("stop", "-w", "-t", str(PG_CTL_TIMEOUT_S), "-m", mode)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server (``mode``) and start it again, on the same port.

        Every connection open before is broken; returns once new ones are accepted.
        """
        self._pg_ctl("restart", "-w", "-t", str(PG_CTL_TIMEOUT_S), "-m", mode, "-l", str(self.log))

    def close(self) -> None:
        """Stop the server at once, if it runs, and remove the directory."""
        try:
            if self.running:
                try:
                    self.stop("immediate")
                except PgClusterError:
                    self._kill()
                    raise
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _configure(self) -> None:
        # Appended, so these win over any earlier line; restart keeps them.
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.port}\nunix_socket_directories = '{self.directory}'\n")

    def _pg_ctl(self, *args: str) -> str:
        argv = [str(self.bindir / "pg_ctl"), "--pgdata", str(self.datadir), *args]
        return _run(argv, cwd=self.directory, log=self.log)

    def _log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def _kill(self) -> None:
        with suppress(OSError, ValueError, IndexError):
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
