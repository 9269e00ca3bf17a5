from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from kied.daemon import run
from kied.settings import FileLockSettings, Settings, SqliteStoreSettings
from tests.pg import PgCluster, PgClusterTemplate, PgDatabases, PgServer
from tests.s3 import MotoServer, S3Target

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

REPO = Path(__file__).resolve().parents[1]
# Files the tests read (callback samples, the Render blueprint schema), kept in the repository.
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    db = tmp_path / "kied.db"
    return Settings(
        host="127.0.0.1",
        port=0,
        store=SqliteStoreSettings(path=db),
        lock=FileLockSettings(path=tmp_path / "kied.db.lock", retry_s=0.05),
        # KIE is never reached from tests: nothing listens on the discard port.
        kie_base_url="http://127.0.0.1:9",
        kie_api_key="test-key",
        shutdown_grace_s=5.0,
    )


@dataclass
class RunningDaemon:
    url: str
    stop: trio.Event
    done: trio.Event
    settings: Settings

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)

    async def shutdown(self) -> None:
        self.stop.set()
        with trio.fail_after(10):
            await self.done.wait()


class DaemonStarter:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def __call__(self, settings: Settings, **overrides: object) -> RunningDaemon:
        if overrides:
            settings = replace(settings, **overrides)  # type: ignore[arg-type]
        stop = trio.Event()
        done = trio.Event()

        async def runner(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await run(settings, stop=stop, task_status=task_status)
            finally:
                done.set()

        with trio.fail_after(10):
            urls: list[str] = await self._nursery.start(runner)
        return RunningDaemon(url=urls[0], stop=stop, done=done, settings=settings)


@pytest.fixture
async def start_daemon(nursery: trio.Nursery) -> AsyncIterator[DaemonStarter]:
    return DaemonStarter(nursery)


async def wait_for(predicate, *, within_s: float = 10.0, interval: float = 0.02):
    """Poll an async predicate until it returns a truthy value."""
    with trio.fail_after(within_s):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(interval)


PYTHON = sys.executable


# ------------------------------------------------------------------- PostgreSQL (tests/pg.py)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The PostgreSQL server of the ``PG*`` variables; connects only when first used."""
    server = PgServer()
    yield server
    server.close()


@pytest.fixture
def pg_databases(pg_server: PgServer) -> Iterator[PgDatabases]:
    """Makes migrated (or empty) databases for this test; drops them when it ends."""
    databases = PgDatabases(pg_server)
    yield databases
    databases.drop_all()


@pytest.fixture
def pg_url(pg_databases: PgDatabases) -> str:
    """The URL of a fresh, migrated PostgreSQL database of this test's own."""
    return pg_databases.new()


@pytest.fixture(scope="session")
def pg_cluster_template() -> Iterator[PgClusterTemplate]:
    """A PostgreSQL data directory made by ``initdb`` once per session, for ``pg_cluster``."""
    template = PgClusterTemplate()
    yield template
    template.remove()


@pytest.fixture
def pg_cluster(pg_cluster_template: PgClusterTemplate) -> Iterator[PgCluster]:
    """A running PostgreSQL cluster of this test's own, to stop or restart at will.

    Never the server of ``pg_server``, which others share. Stopped (immediate) and removed
    when the test ends.
    """
    cluster = PgCluster(pg_cluster_template)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


# ------------------------------------------------------------------- S3 (tests/s3.py)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A real S3-compatible server (moto, a process of its own); starts when first used."""
    server = MotoServer()
    yield server
    server.close()


@pytest.fixture
def s3_server(moto_server: MotoServer) -> S3Target:
    """A fresh bucket on the S3 server, with its endpoint URL and credentials."""
    return moto_server.new_bucket()
