"""The ``pg_cluster`` fixture: a PostgreSQL server of the test's own, really restarted."""

from __future__ import annotations

import psycopg
import pytest

from kied.store._migrations import POSTGRES_MIGRATIONS
from tests.pg import PgServer


def test_the_cluster_is_its_own_server_set_for_speed(pg_cluster):
    assert pg_cluster.directory.is_dir()
    assert pg_cluster.port != PgServer().port
    with pg_cluster.connect() as conn:
        (port,) = conn.execute("SHOW port").fetchone()
        (fsync,) = conn.execute("SHOW fsync").fetchone()
    assert int(port) == pg_cluster.port
    assert fsync == "off"


def test_create_database_migrates_it(pg_cluster):
    url = pg_cluster.create_database("kied")
    assert url == pg_cluster.url("kied")
    with psycopg.connect(url) as conn:
        (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    assert version == len(POSTGRES_MIGRATIONS)


def test_restart_breaks_open_connections_and_accepts_new_ones(pg_cluster):
    before = pg_cluster.connect()
    (started,) = before.execute("SELECT pg_postmaster_start_time()").fetchone()

    pg_cluster.restart()

    with pytest.raises(psycopg.OperationalError):
        before.execute("SELECT 1")
    before.close()
    with pg_cluster.connect() as after:
        (restarted,) = after.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert restarted > started


def test_stop_and_start(pg_cluster):
    pg_cluster.stop()
    assert not pg_cluster.running
    with pytest.raises(psycopg.OperationalError):
        pg_cluster.connect()
    pg_cluster.start()
    assert pg_cluster.running
    with pg_cluster.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
