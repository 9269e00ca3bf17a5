"""kied fails closed: it will not run open by accident, stops at once on a setting that can
never work, keeps secrets and forged lines out of its log, and keeps ``/metrics`` and
``/readyz``'s detail from the internet. Real ``kied serve`` processes, and the app in process
for clients from other machines."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from kied.daemon import Daemon, run
from kied.errors import StoreMisconfiguredError
from kied.settings import (
    NoLockSettings,
    PostgresStoreSettings,
    Settings,
    SqliteStoreSettings,
)
from kied.store import SqliteStore
from kied.web import create_app
from tests.pg import PgServer
from tests.procs import PYTHON, kied, read_url, stop

if TYPE_CHECKING:
    from pathlib import Path

API_TOKEN = "api-token-SECRET-0123456789"
CALLBACK_TOKEN = "callback-token-SECRET-0123456789"
TOKENS = {"KIED_API_TOKEN": API_TOKEN, "KIED_CALLBACK_TOKEN": CALLBACK_TOKEN}


def refused(*args: str, env: dict[str, str], cwd: Path, within_s: float = 30) -> list[str]:
    """Run ``kied serve ARGS``, which must stop with status 2; its ``kied:`` lines."""
    proc = kied("serve", *args, env=env, cwd=cwd)
    try:
        _out, err = proc.communicate(timeout=within_s)
    finally:
        stop(proc)
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("kied: ")]


# ------------------------------------------------------------------------- running open


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (
            [],
            {"PORT": "0"},
            "kied: KIED_API_TOKEN: listening on 0.0.0.0 without an API token and without"
            " callback authentication (KIED_CALLBACK_TOKEN or KIE_WEBHOOK_HMAC_KEY); set them,"
            " or KIED_ALLOW_OPEN=1 to run open on purpose",
        ),
        (
            ["--host", "0.0.0.0", "--port", "0"],
            {"KIED_API_TOKEN": API_TOKEN},
            "kied: KIED_CALLBACK_TOKEN: listening on 0.0.0.0 without callback authentication"
            " (KIED_CALLBACK_TOKEN or KIE_WEBHOOK_HMAC_KEY); set it, or KIED_ALLOW_OPEN=1 to"
            " run open on purpose",
        ),
        (
            ["--port", "0"],
            {"KIED_HOST": "::", "KIED_CALLBACK_TOKEN": CALLBACK_TOKEN},
            "kied: KIED_API_TOKEN: listening on :: without an API token; set it, or"
            " KIED_ALLOW_OPEN=1 to run open on purpose",
        ),
    ],
)
def test_open_on_all_addresses_is_refused_with_one_line(tmp_path, args, env, says):
    assert refused(*args, env=env, cwd=tmp_path) == [says]
    assert not (tmp_path / "var").exists()  # refused before anything was created


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "warning"),
    [
        ({"KIED_HOST": "0.0.0.0", "KIED_ALLOW_OPEN": "1"}, "running open on purpose"),
        ({}, "running open on loopback"),
        ({"KIED_HOST": "0.0.0.0", **TOKENS}, None),
    ],
)
def test_open_on_purpose_or_on_loopback_serves_with_one_warning(tmp_path, env, warning):
    proc = kied("serve", "--port", "0", env=env, cwd=tmp_path)
    try:
        read_url(proc)
    finally:
        assert stop(proc) == 0
    proc = kied("serve", "--port", "0", env=env, cwd=tmp_path)
    lines = []
    try:
        assert proc.stderr is not None
        while "listening on" not in (lines[-1] if lines else ""):
            lines.append(proc.stderr.readline())
    finally:
        stop(proc)
    warnings = [line for line in lines if " WARNING " in line]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert warning in warnings[0]


# A stand-in for systemd's socket activation (as in test_deploy): fd 3 is the socket.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "kied", "serve", *sys.argv[2:]])
"""


@pytest.mark.slow
def test_a_passed_socket_on_all_addresses_is_refused_without_tokens(tmp_path):
    listener = socket.create_server(("0.0.0.0", 0))
    try:
        proc = subprocess.Popen(
            [PYTHON, "-c", _ACTIVATE, str(listener.fileno()), "--database", str(tmp_path / "k.db")],
            env=_env({"LISTEN_FDS": "1"}),
            pass_fds=(listener.fileno(),),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _out, err = proc.communicate(timeout=30)
        finally:
            stop(proc)  # when it did not stop by itself
    finally:
        listener.close()
    assert proc.returncode == 2, err
    assert err.splitlines() == [
        "kied: KIED_API_TOKEN: listening on 0.0.0.0 without an API token and without callback"
        " authentication (KIED_CALLBACK_TOKEN or KIE_WEBHOOK_HMAC_KEY); set them, or"
        " KIED_ALLOW_OPEN=1 to run open on purpose"
    ]


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    keep = ("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER", "LISTEN_", "NOTIFY_", "WATCHDOG_")
    return {k: v for k, v in os.environ.items() if not k.startswith(keep)} | extra


# ------------------------------------------------------------- settings that never work


def _pg(dbname: str, *, user: str | None = None) -> str:
    server = PgServer()
    url = server.url(dbname)
    return url if user is None else url.replace(f"//{server.user}@", f"//{user}:pw-SECRET@")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("database", "says"),
    [
        pytest.param(
            lambda: _pg("no_such_db_xyz"),
            r"kied: KIED_DATABASE_URL: postgresql://\S+/no_such_db_xyz: PostgreSQL: .*FATAL: "
            r'database "no_such_db_xyz" does not exist',
            id="unknown database",
        ),
        pytest.param(
            lambda: _pg("postgres", user="no_such_role_xyz"),
            r"kied: KIED_DATABASE_URL: postgresql://no_such_role_xyz:\*\*\*@\S+/postgres:"
            r' PostgreSQL: .*FATAL: role "no_such_role_xyz" does not exist',
            id="unknown role",
        ),
        pytest.param(
            lambda: "postgresql://kied:p@ss@db.internal:x/kied",
            r"kied: --database: has more than one @ before the host; write an @ in the user"
            r" or password as %40 \(postgresql://kied:\*\*\*@db\.internal:x/kied\)",
            id="malformed URL",
        ),
        pytest.param(
            lambda: "postgresql://kied:pw-SECRET@db.internal:54x/kied",
            r"kied: --database: has port '54x', not a number 1-65535"
            r" \(postgresql://kied:\*\*\*@db\.internal:54x/kied\)",
            id="port not a number",
        ),
    ],
)
def test_a_database_that_can_never_work_stops_kied_with_one_line(tmp_path, database, says):
    started = time.monotonic()
    lines = refused("--port", "0", "--database", database(), env={}, cwd=tmp_path)
    assert len(lines) == 1, lines
    assert re.fullmatch(says, lines[0]), lines[0]
    assert "SECRET" not in lines[0]
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_a_data_directory_that_is_a_file_stops_kied_with_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory\n")
    database = tmp_path / "file" / "kied.db"
    assert refused("--port", "0", "--database", str(database), env={}, cwd=tmp_path) == [
        f"kied: KIED_DATABASE_URL: {database}: {tmp_path / 'file'} is a file, not a directory"
    ]


@pytest.mark.slow
def test_a_data_directory_kied_cannot_write_stops_kied_with_one_line(tmp_path):
    # /proc takes no new files, even from root (a chmod'd directory would not stop root).
    lines = refused("--port", "0", "--database", "/proc/kied-test.db", env={}, cwd=tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(
        "kied: KIED_DATABASE_URL: /proc/kied-test.db: cannot write in /proc:"
    )


@pytest.mark.slow
def test_an_unreachable_database_is_retried_with_few_lines(tmp_path):
    # Nothing listens on port 9: connection refused, which may pass, so kied retries.
    database = "postgresql://kied@127.0.0.1:9/kied"
    proc = kied("serve", "--port", "0", "--database", database, cwd=tmp_path)
    try:
        read_url(proc)
        time.sleep(6)
        assert proc.poll() is None  # still serving, still retrying
    finally:
        proc.send_signal(15)
        try:
            _out, log = proc.communicate(timeout=20)
        finally:
            stop(proc)
    assert proc.returncode == 0
    retries = [
        line
        for line in log.splitlines()
        if re.search(r"storage unavailable|cannot reach PostgreSQL|lost its connection", line)
    ]
    # Each of storage, the lock and the change listener: one line per back-off step.
    assert 3 <= len(retries) <= 20, "\n".join(retries)


# ---------------------------------------------------------------------- secrets in logs


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_debug_log_over_http2_holds_no_secret_and_no_raw_control_character(tmp_path, log_format):
    env = {**TOKENS, "KIE_API_KEY": "kie-key-SECRET-0123456789", "KIED_LOG_FORMAT": log_format}
    proc = kied("serve", "--port", "0", "--log-level", "DEBUG", env=env, cwd=tmp_path)
    try:
        url = re.sub(r"[^\d]+$", "", read_url(proc))  # a JSON line goes on after the URL
        with httpx.Client(base_url=url, http1=False, http2=True, timeout=10) as client:
            r = client.get("/v1/jobs", headers={"Authorization": f"Bearer {API_TOKEN}"})
            assert (r.http_version, r.status_code) == ("HTTP/2", 200)
            r = client.post(
                f"/callbacks/kie?job=a%0Ab%1B[31m%C2%9B&token={CALLBACK_TOKEN}",
                headers={"X-KIE-Callback-Token": CALLBACK_TOKEN},
                content=b'{"code": 200, "data": {"taskId": "t1", "state": "success"}}',
            )
            assert r.status_code == 200
    finally:
        proc.send_signal(15)
        try:
            _out, log = proc.communicate(timeout=20)
        finally:
            stop(proc)
    assert "hpack" not in log  # the header codec said nothing at DEBUG
    assert "[KIE_CALLBACK]" in log
    for secret in (API_TOKEN, CALLBACK_TOKEN, "kie-key-SECRET"):
        assert secret not in log
    for char in log:
        assert char in "\n\t" or not (ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F), repr(char)
    if log_format == "json":
        messages = [json.loads(line)["message"] for line in log.splitlines()]
        assert any("a\nb\x1b[31m\x9b" in message for message in messages)
    else:
        assert r"job a\nb\x1b[31m\x9b" in log
        assert not any(line.startswith("b") for line in log.splitlines())


# ------------------------------------------------------------------ /metrics and /readyz


def _app(tmp_path: Path, **settings: Any) -> tuple[Daemon, Any]:
    config = Settings(
        store=settings.pop("store", SqliteStoreSettings(path=tmp_path / "unused.db")),
        lock=NoLockSettings(),
        kie_base_url="http://127.0.0.1:9",
        **settings,
    )
    daemon = Daemon(config)
    return daemon, create_app(
        callbacks=daemon.callbacks, jobs=daemon.jobs, status=daemon, settings=config
    )


def _client(app: Any, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://kied.test")


ELSEWHERE = "203.0.113.9"


@pytest.mark.parametrize(
    ("settings", "address", "authorization", "status"),
    [
        ({}, "127.0.0.1", None, 200),
        ({}, "::1", None, 200),
        ({}, ELSEWHERE, None, 401),
        ({"api_token": API_TOKEN}, ELSEWHERE, None, 401),
        ({"api_token": API_TOKEN}, ELSEWHERE, f"Bearer {API_TOKEN}", 200),
        ({"api_token": API_TOKEN}, ELSEWHERE, "Bearer wrong", 401),
        ({"metrics_token": "m-token"}, ELSEWHERE, "Bearer m-token", 200),
        ({"metrics_token": "m-token"}, "127.0.0.1", None, 401),
        (
            {"metrics_token": "m-token", "api_token": API_TOKEN},
            ELSEWHERE,
            f"Bearer {API_TOKEN}",
            401,
        ),
    ],
)
async def test_metrics_answer_loopback_or_a_token(
    tmp_path, settings, address, authorization, status
):
    _daemon, app = _app(tmp_path, **settings)
    headers = {"Authorization": authorization} if authorization else {}
    async with _client(app, address) as http:
        r = await http.get("/metrics", headers=headers)
    assert r.status_code == status
    if status == 200:
        assert "kied_" in r.text
    else:
        assert r.json()["error"] == "unauthorized"
        assert "kied_" not in r.text


async def test_readyz_tells_the_detail_to_loopback_clients_only(tmp_path, caplog):
    url = "postgresql://kied:pw@db-host.internal.example:1/kied"
    daemon, app = _app(
        tmp_path,
        store=PostgresStoreSettings(url=url.replace("db-host.internal.example", "127.0.0.1")),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run_storage)
        for _ in range(200):
            if await daemon.readiness() != "storage is opening":
                break
            await trio.sleep(0.05)
        async with _client(app, ELSEWHERE) as http:
            far = await http.get("/readyz")
        async with _client(app, "127.0.0.1") as http:
            near = await http.get("/readyz")
        nursery.cancel_scope.cancel()
    assert far.status_code == near.status_code == 503
    assert far.json() == {"status": "unavailable", "reason": "storage unavailable"}
    assert "127.0.0.1" in near.json()["reason"]
    assert "127.0.0.1" in caplog.text  # the detail is in the log


async def test_a_sqlite_directory_that_is_a_file_is_misconfigured_not_retried(tmp_path):
    (tmp_path / "file").write_text("not a directory\n")
    path = tmp_path / "file" / "kied.db"
    with pytest.raises(StoreMisconfiguredError, match=r"Not a directory|File exists"):
        await SqliteStore.connect(path)


async def test_the_daemon_stops_on_storage_that_can_never_open(tmp_path, autojump_clock):
    (tmp_path / "file").write_text("not a directory\n")
    settings = Settings(
        host="127.0.0.1",
        port=0,
        store=SqliteStoreSettings(path=tmp_path / "file" / "kied.db"),
        lock=NoLockSettings(),
        kie_base_url="http://127.0.0.1:9",
    )
    with trio.fail_after(60), pytest.raises(BaseExceptionGroup) as caught:
        await run(settings, stop=trio.Event())
    assert caught.value.subgroup(StoreMisconfiguredError) is not None
