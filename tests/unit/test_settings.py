from __future__ import annotations

from pathlib import Path

import pytest

from kied.errors import ConfigError
from kied.settings import (
    FileLockSettings,
    NoLockSettings,
    PgLockSettings,
    PostgresStoreSettings,
    SqliteStoreSettings,
    load_settings,
)


def test_defaults_are_a_sqlite_file_and_a_file_lock_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({})
    assert s.host == "127.0.0.1"
    assert s.port == 8080
    assert s.store == SqliteStoreSettings(path=tmp_path / "var" / "kied.db")
    assert s.lock == FileLockSettings(path=tmp_path / "var" / "kied.db.lock")
    assert s.job_timeout_s == 900
    assert s.kie_base_url == "https://api.kie.ai"
    assert s.public_url is None


def test_render_port_binds_all_interfaces_and_takes_render_url():
    s = load_settings(
        {
            "PORT": "10000",
            "RENDER_EXTERNAL_URL": "https://kied.onrender.com/",
            "KIED_DATABASE_URL": "/srv/kied.db",
        }
    )
    assert (s.host, s.port) == ("0.0.0.0", 10000)
    assert s.public_url == "https://kied.onrender.com"


def test_state_directory_is_used_under_systemd():
    s = load_settings({"STATE_DIRECTORY": "/var/lib/kied:/var/lib/other"})
    assert s.store == SqliteStoreSettings(path=Path("/var/lib/kied/kied.db"))


def test_flags_win_over_the_environment():
    s = load_settings(
        {"PORT": "9000", "KIED_HOST": "0.0.0.0", "KIED_LOCK": "file"},
        [
            "--port",
            "0",
            "--host",
            "127.0.0.2",
            "--database",
            "sqlite:////tmp/x.db",
            "--lock",
            "none",
        ],
    )
    assert (s.host, s.port) == ("127.0.0.2", 0)
    assert s.store == SqliteStoreSettings(path=Path("/tmp/x.db"))
    assert s.lock == NoLockSettings()


def test_database_url_wins_over_render_database_url():
    s = load_settings({"KIED_DATABASE_URL": "/a.db", "DATABASE_URL": "/b.db"})
    assert s.store == SqliteStoreSettings(path=Path("/a.db"))


def test_explicit_lock_file_and_secrets():
    s = load_settings(
        {
            "KIED_LOCK": "file:/run/kied.lock",
            "KIED_CALLBACK_TOKEN": " tok ",
            "KIE_WEBHOOK_HMAC_KEY": "key",
            "KIED_JOB_TIMEOUT": "1800",
            "KIED_CREATE_QUEUE_MAX": "7200",
        }
    )
    assert s.lock == FileLockSettings(path=Path("/run/kied.lock"))
    assert s.callback_token == "tok"
    assert s.webhook_hmac_key == b"key"
    assert s.job_timeout_s == 1800
    assert s.create_queue_max_s == 7200


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_url_takes_the_postgres_lock_by_default(scheme):
    url = f"{scheme}://kied:secret@db.internal:5432/kied?sslmode=require"
    s = load_settings({"DATABASE_URL": url})
    assert s.store == PostgresStoreSettings(url=url)
    assert s.lock == PgLockSettings()


def test_postgres_on_render():
    s = load_settings({"RENDER": "true", "PORT": "10000", "DATABASE_URL": "postgresql://h/db"})
    assert s.store == PostgresStoreSettings(url="postgresql://h/db")
    assert s.lock == PgLockSettings()


@pytest.mark.parametrize(
    ("environ", "lock"),
    [
        ({"KIED_DATABASE_URL": "postgresql://h/db", "KIED_LOCK": "postgres"}, PgLockSettings()),
        ({"KIED_DATABASE_URL": "postgresql://h/db", "KIED_LOCK": "none"}, NoLockSettings()),
        (
            {"RENDER": "true", "KIED_DATABASE_URL": "/srv/kied.db", "KIED_LOCK": "none"},
            NoLockSettings(),
        ),
    ],
)
def test_lock_choices(environ, lock):
    assert load_settings(environ).lock == lock


@pytest.mark.parametrize(
    ("environ", "argv", "setting", "says"),
    [
        # A file lock cannot elect one leader among instances sharing a database.
        (
            {"KIED_DATABASE_URL": "postgresql://h/db", "KIED_LOCK": "file"},
            [],
            "KIED_LOCK",
            "KIED_LOCK=postgres",
        ),
        (
            {"DATABASE_URL": "postgres://h/db", "KIED_LOCK": "file:/run/kied.lock"},
            [],
            "KIED_LOCK",
            "KIED_LOCK=postgres",
        ),
        ({"DATABASE_URL": "postgres://h/db"}, ["--lock", "file"], "--lock", "KIED_LOCK=postgres"),
        # On Render instances share no disk, so no file lock at all, default or not.
        ({"RENDER": "true"}, [], "KIED_LOCK", "RENDER"),
        (
            {"RENDER": "true", "KIED_LOCK": "file:/var/data/kied.lock"},
            [],
            "KIED_LOCK",
            "KIED_LOCK=postgres",
        ),
        # The postgres lock lives in the PostgreSQL database.
        ({"KIED_LOCK": "postgres"}, [], "KIED_LOCK", "postgresql://"),
    ],
)
def test_lock_that_cannot_work_stops_the_start(environ, argv, setting, says):
    with pytest.raises(ConfigError) as info:
        load_settings(environ, argv)
    assert info.value.setting == setting
    assert says in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("environ", "argv", "setting"),
    [
        ({"PORT": "http"}, [], "PORT"),
        ({"PORT": "70000"}, [], "PORT"),
        ({}, ["--port", "-1"], "--port"),
        ({"KIED_JOB_TIMEOUT": "0"}, [], "KIED_JOB_TIMEOUT"),
        ({"KIED_JOB_TIMEOUT": "soon"}, [], "KIED_JOB_TIMEOUT"),
        ({"KIED_CREATE_QUEUE_MAX": "0"}, [], "KIED_CREATE_QUEUE_MAX"),
        ({"KIED_CREATE_QUEUE_MAX": "an hour"}, [], "KIED_CREATE_QUEUE_MAX"),
        ({"KIED_LOCK": "flock"}, [], "KIED_LOCK"),
        ({"KIED_LOCK": "file:"}, [], "KIED_LOCK"),
        ({"KIED_DATABASE_URL": "mysql://x/y"}, [], "KIED_DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://relative.db"}, [], "DATABASE_URL"),
        ({"KIED_DATABASE_URL": "/var/lib/kied/"}, [], "KIED_DATABASE_URL"),
        ({"KIE_BASE_URL": "api.kie.ai"}, [], "KIE_BASE_URL"),
        ({"KIED_PUBLIC_URL": "ftp://x"}, [], "KIED_PUBLIC_URL"),
        ({"KIED_LOG_LEVEL": "LOUD"}, [], "KIED_LOG_LEVEL"),
        ({"KIED_RESUBMIT": "always"}, [], "KIED_RESUBMIT"),
        ({"KIED_RESUBMIT_WAIT": "-5"}, [], "KIED_RESUBMIT_WAIT"),
        ({"KIED_EVENT_RETENTION_DAYS": "0"}, [], "KIED_EVENT_RETENTION_DAYS"),
        ({"KIED_EVENT_RETENTION_DAYS": "a week"}, [], "KIED_EVENT_RETENTION_DAYS"),
        ({}, ["--bogus"], "command line"),
    ],
)
def test_bad_values_name_the_setting(environ, argv, setting):
    with pytest.raises(ConfigError) as info:
        load_settings(environ, argv)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert "\n" not in str(info.value)


def test_event_retention():
    assert load_settings({}).event_retention_s == 7 * 86400
    assert load_settings({"KIED_EVENT_RETENTION_DAYS": "0.5"}).event_retention_s == 43200


def test_a_lost_createtask_is_never_sent_again_unless_asked():
    default = load_settings({})
    assert (default.resubmit, default.resubmit_wait_s) == ("never", 300.0)
    chosen = load_settings({"KIED_RESUBMIT": "After-Wait", "KIED_RESUBMIT_WAIT": "90"})
    assert (chosen.resubmit, chosen.resubmit_wait_s) == ("after-wait", 90.0)


def test_outside_systemd_there_is_no_notify_watchdog_or_passed_socket():
    s = load_settings({}, pid=100)
    assert s.notify_socket is None
    assert s.watchdog_s is None
    assert s.listen_fds == 0
    assert s.log_format == "text"


@pytest.mark.parametrize("address", ["/run/systemd/notify", "@kied-notify"])
def test_systemd_notify_socket_and_watchdog(address):
    s = load_settings(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "100"}, pid=100
    )
    assert s.notify_socket == address
    assert s.watchdog_s == 30.0


@pytest.mark.parametrize(
    ("environ", "watchdog_s"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.2),  # WATCHDOG_PID unset: ours
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "99"}, None),  # another process's
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_is_ours_unless_another_pid_is_named(environ, watchdog_s):
    s = load_settings({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}, pid=100)
    assert s.watchdog_s == watchdog_s


def test_watchdog_needs_somewhere_to_send_pings():
    assert load_settings({"WATCHDOG_USEC": "200000"}, pid=100).watchdog_s is None


@pytest.mark.parametrize(
    ("environ", "listen_fds"),
    [
        ({"LISTEN_FDS": "1"}, 1),  # LISTEN_PID unset: ours
        ({"LISTEN_FDS": "2", "LISTEN_PID": "100"}, 2),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "99"}, 0),  # passed to another process
        ({"LISTEN_FDS": "bogus", "LISTEN_PID": "99"}, 0),  # not ours, so not our problem
    ],
)
def test_socket_activation_is_ours_unless_another_pid_is_named(environ, listen_fds):
    assert load_settings(environ, pid=100).listen_fds == listen_fds


@pytest.mark.parametrize(
    ("value", "log_format"), [("text", "text"), ("json", "json"), ("JSON", "json")]
)
def test_log_format(value, log_format):
    assert load_settings({"KIED_LOG_FORMAT": value}).log_format == log_format
    assert load_settings({}, ["--log-format", value]).log_format == log_format


@pytest.mark.parametrize(
    ("environ", "argv", "setting"),
    [
        ({"LISTEN_FDS": "0"}, [], "LISTEN_FDS"),
        ({"LISTEN_FDS": "-1"}, [], "LISTEN_FDS"),
        ({"LISTEN_FDS": "three"}, [], "LISTEN_FDS"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "me"}, [], "LISTEN_PID"),
        ({"NOTIFY_SOCKET": "run/notify"}, [], "NOTIFY_SOCKET"),
        ({"NOTIFY_SOCKET": "@"}, [], "NOTIFY_SOCKET"),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "0"}, [], "WATCHDOG_USEC"),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30s"}, [], "WATCHDOG_USEC"),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "x"}, [], "WATCHDOG_PID"),
        ({"KIED_LOG_FORMAT": "xml"}, [], "KIED_LOG_FORMAT"),
        ({}, ["--log-format", "logfmt"], "--log-format"),
    ],
)
def test_bad_systemd_and_log_values_name_the_setting(environ, argv, setting):
    with pytest.raises(ConfigError) as info:
        load_settings(environ, argv, pid=100)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert "\n" not in str(info.value)


def test_the_status_query_budget_defaults_to_8_and_is_validated():
    assert load_settings({}).status_queries_per_s == 8.0
    assert load_settings({"KIED_STATUS_QUERIES_PER_S": "2.5"}).status_queries_per_s == 2.5
    assert load_settings({"KIED_STATUS_QUERIES_PER_S": "9"}).status_queries_per_s == 9.0
    for bad in ("0", "-1", "9.5", "nan", "inf", "lots"):
        with pytest.raises(ConfigError, match="KIED_STATUS_QUERIES_PER_S"):
            load_settings({"KIED_STATUS_QUERIES_PER_S": bad})
