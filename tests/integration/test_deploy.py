"""kied as it is deployed: the systemd units, sd_notify, socket activation, the Render
Blueprint, and SIGTERM in the middle of a burst of callbacks. Real `kied serve` processes."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import jsonschema
import pytest
import trio
import yaml

from kied._sdnotify import SystemdNotifier, run_watchdog
from kied.settings import ENVIRONMENT_HELP, PgLockSettings, PostgresStoreSettings, load_settings
from tests.conftest import FIXTURES, REPO
from tests.procs import PYTHON, free_port, kied, mode, read_url, stop, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.slow

SYSTEMD = REPO / "systemd"
README = (REPO / "README.md").read_text()
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)
#: kied's own bound on a stop, SIGTERM to exit
SHUTDOWN_GRACE_S = load_settings({}, pid=1).shutdown_grace_s
#: what a test process must not inherit from whoever runs the tests
_NOT_INHERITED = (
    *("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER"),
    *("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"),  # systemd's, when the tests run under it
)


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections and their entries; a key may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def readme_section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


# ----------------------------------------------------------------------- systemd units


def _stage_root(root: Path) -> None:
    """A root holding the distribution's units, kied's, and a stub at ExecStart's path."""
    system_units = next(
        p
        for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
        if (p / "sysinit.target").exists()
    )
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in ("kied.service", "kied.socket"):
        shutil.copy(SYSTEMD / name, etc / name)
    exec_start = unit_entries(SYSTEMD / "kied.service")["Service"]["ExecStart"][0].split()[0]
    stub = root / exec_start.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "verify",
            f"--root={root}",
            "--man=no",
            "/etc/systemd/system/kied.socket",
            "/etc/systemd/system/kied.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


@needs_systemd_analyze
def test_units_verify_without_a_single_complaint(tmp_path):
    root = tmp_path / "root"
    _stage_root(root)
    result = _verify(root)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    # The same check sees a mistake: it is not passing because it reads nothing.
    service = root / "etc/systemd/system/kied.service"
    service.write_text(service.read_text().replace("Type=notify", "Type=notifyy"))
    broken = _verify(root)
    assert "notifyy" in broken.stdout + broken.stderr


@needs_systemd_analyze
def test_hardening_scores_2_or_better():
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(SYSTEMD / "kied.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = re.search(r"Overall exposure level for kied\.service: (\d+(?:\.\d+)?)", output)
    assert found, output
    assert float(found.group(1)) <= 2.0, output


def test_service_unit_fits_kied():
    service = unit_entries(SYSTEMD / "kied.service")["Service"]

    def one(key: str) -> str:
        assert len(service.get(key, [])) == 1, key
        return service[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == "/opt/kied/.venv/bin/kied serve"
    assert one("Restart") == "on-failure"
    # kied's default database is $STATE_DIRECTORY/kied.db, its lock file beside it.
    assert one("StateDirectory") == "kied"
    store = load_settings({"STATE_DIRECTORY": "/var/lib/kied"}, pid=1).store
    assert str(getattr(store, "path", "")) == "/var/lib/kied/kied.db"
    assert one("EnvironmentFile") == "-/etc/kied/kied.env"
    assert one("DynamicUser") == "yes"
    assert float(one("TimeoutStopSec")) > SHUTDOWN_GRACE_S
    assert float(one("WatchdogSec")) >= 10
    # The README tells operators where to install and how to start it.
    vm = readme_section("Run on a VM with systemd")
    assert "/opt/kied/.venv/bin/kied" in vm
    assert "systemctl enable --now kied.socket" in vm
    assert "/var/lib/kied" in vm
    assert f"TimeoutStopSec={one('TimeoutStopSec')}" in README

    socket_unit = unit_entries(SYSTEMD / "kied.socket")
    # Loopback by default: on all addresses kied would need its tokens.
    assert socket_unit["Socket"]["ListenStream"] == ["127.0.0.1:8080"]


def test_env_example_names_only_settings_kied_knows():
    text = (SYSTEMD / "kied.env.example").read_text()
    names = re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE)
    assert {"KIE_API_KEY", "KIED_CALLBACK_TOKEN", "KIED_API_TOKEN"} <= set(names)
    for name in names:
        assert re.search(rf"\b{name}\b", ENVIRONMENT_HELP), name
    # Every line that sets a value sets an empty one: the example holds no secret.
    assert re.findall(r"^[A-Z][A-Z0-9_]+=(.+)$", text, flags=re.MULTILINE) == []


# ---------------------------------------------------------------- real kied processes


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    env.update(extra)
    return env


class NotifyListener:
    """A fake systemd notification socket: a path or an @abstract name."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.seen: list[str] = []

    def next(self, within_s: float = 20) -> str:
        self.sock.settimeout(within_s)
        message = self.sock.recv(65536).decode()
        self.seen.append(message)
        return message

    def until(self, predicate: Callable[[str], bool], within_s: float = 20) -> str:
        deadline = time.monotonic() + within_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not within {within_s} s; seen: {self.seen}"
            message = self.next(remaining)
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_listener(request: pytest.FixtureRequest) -> Iterator[NotifyListener]:
    if request.param == "path":
        # Socket paths are limited to 107 bytes, so not under pytest's deep tmp_path.
        directory = tempfile.mkdtemp(prefix="kied-notify-", dir="/tmp")
        listener = NotifyListener(os.path.join(directory, "notify"))
    else:
        directory = None
        listener = NotifyListener(f"@kied-notify-{uuid.uuid4().hex}")
    yield listener
    listener.close()
    if directory is not None:
        shutil.rmtree(directory)


def test_notifier_without_systemd_does_nothing():
    assert SystemdNotifier(None).notify("READY=1") is False


def test_notifier_failure_is_logged_once_loudly(tmp_path, caplog):
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="kied._sdnotify"):
        assert notifier.notify("READY=1") is False
        assert notifier.notify("STATUS=ACTIVE") is False
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    assert "cannot notify systemd" in caplog.records[0].getMessage()


async def test_watchdog_pings_at_the_interval(notify_listener, autojump_clock):
    with trio.move_on_after(0.35):
        await run_watchdog(SystemdNotifier(notify_listener.address), 0.1)
    notify_listener.sock.setblocking(False)
    pings = []
    with contextlib.suppress(BlockingIOError):
        while True:
            pings.append(notify_listener.sock.recv(100))
    assert pings == [b"WATCHDOG=1"] * 4  # at 0, 0.1, 0.2 and 0.3 s


def _status(message: str) -> str | None:
    for line in message.split("\n"):
        if line.startswith("STATUS="):
            return line.removeprefix("STATUS=")
    return None


def test_systemd_hears_ready_status_watchdog_and_stopping(tmp_path, notify_listener):
    db = str(tmp_path / "kied.db")
    # Another instance holds the lock, so the one under test starts PASSIVE.
    holder = kied("serve", "--port", "0", "--database", db, cwd=tmp_path)
    proc = None
    try:
        holder_url = read_url(holder)
        wait_until(lambda: mode(holder_url) == "ACTIVE")
        port = free_port()
        proc = kied(
            "serve",
            "--port",
            str(port),
            "--database",
            db,
            cwd=tmp_path,
            env={"NOTIFY_SOCKET": notify_listener.address, "WATCHDOG_USEC": "200000"},
        )
        first = notify_listener.next()
        # READY=1 is the first thing systemd hears, and the port accepts at that moment.
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert first.split("\n")[0] == "READY=1"
        assert (_status(first) or "").startswith("PASSIVE; ")

        notify_listener.until(lambda m: (_status(m) or "").startswith("PASSIVE; storage ready"))
        assert stop(holder) == 0
        notify_listener.until(lambda m: (_status(m) or "").startswith("ACTIVE; storage ready"))

        # WATCHDOG_USEC=200000: a ping every 0.1 s.
        pings, started = 0, time.monotonic()
        while time.monotonic() - started < 1.0:
            pings += notify_listener.next(within_s=2) == "WATCHDOG=1"
        assert pings >= 5

        proc.send_signal(signal.SIGTERM)
        stopping = notify_listener.until(lambda m: "STOPPING=1" in m.split("\n"))
        assert (_status(stopping) or "").startswith("stopping; ")
        assert proc.wait(timeout=SHUTDOWN_GRACE_S + 5) == 0
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc is not None:
            stop(proc)
        stop(holder)


# A stand-in for systemd's socket activation: the listening socket becomes fd 3, then
# kied runs in this same process, so LISTEN_PID (when set) names it.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
if sys.argv[2] == "set-pid":
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "kied", "serve", *sys.argv[3:]])
"""


def _activate(listener: socket.socket, listen_pid: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            PYTHON,
            "-c",
            _ACTIVATE,
            str(listener.fileno()),
            listen_pid,
            "--database",
            str(tmp_path / "kied.db"),
        ],
        env=_env({"LISTEN_FDS": "1"}),
        pass_fds=(listener.fileno(),),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ask_health(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=20)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: kied\r\nConnection: close\r\n\r\n")
    return conn


def _health_answer(conn: socket.socket) -> int:
    answer = http.client.HTTPResponse(conn)
    answer.begin()
    assert json.loads(answer.read())["status"] == "ok"
    return answer.status


@pytest.mark.parametrize("listen_pid", ["set-pid", "unset"])
def test_socket_activation_serves_the_passed_socket(tmp_path, listen_pid):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # Made before kied runs: it waits in the socket's queue, as under systemd.
    early = _ask_health(port)
    between = None
    proc = _activate(listener, listen_pid, tmp_path)
    try:
        url = read_url(proc)
        assert url == f"http://127.0.0.1:{port}"
        assert _health_answer(early) == 200
        early.close()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert stop(proc) == 0
        # A restart: what arrives while no kied runs waits for the next one.
        between = _ask_health(port)
        proc = _activate(listener, listen_pid, tmp_path)
        assert _health_answer(between) == 200
    finally:
        for conn in (early, between):
            if conn is not None:
                conn.close()
        listener.close()
        rc = stop(proc)
    assert rc == 0


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"LISTEN_FDS": "many"}, "kied: LISTEN_FDS: must be a positive integer, not 'many'"),
        ({"KIED_LOG_FORMAT": "xml"}, "kied: KIED_LOG_FORMAT: must be text or json, not 'xml'"),
    ],
)
def test_bad_deployment_setting_stops_serve_with_one_line(tmp_path, environ, says):
    proc = kied("serve", env=environ, cwd=tmp_path)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [says]


_LOG_TWO_LINES = """
import logging
from kied.cli import configure_logging
configure_logging("INFO", "json")
log = logging.getLogger("kied.pollers")
log.info("[GEN] job %s -> %s", "j1", "succeeded", extra={"action": "job_transition", "job_id": "j1"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("[GEN] poller failed")
"""


def test_json_log_lines_carry_the_extra_fields_and_the_traceback():
    result = subprocess.run(
        [PYTHON, "-c", _LOG_TWO_LINES], capture_output=True, text=True, timeout=30, env=_env({})
    )
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stderr.splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("time"))
    assert first == {
        "level": "INFO",
        "logger": "kied.pollers",
        "message": "[GEN] job j1 -> succeeded",
        "action": "job_transition",
        "job_id": "j1",
    }
    assert (second["level"], second["message"]) == ("ERROR", "[GEN] poller failed")
    assert "ZeroDivisionError" in second["exception"]


_MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute= enforces, kept
# across exec.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "kied", *sys.argv[1:]])
"""


def test_kied_runs_with_memory_deny_write_execute(tmp_path):
    proc = subprocess.Popen(
        [PYTHON, "-c", _MDWE, "serve", "--port", "0"],
        env=_env({"KIE_BASE_URL": "http://127.0.0.1:9"}),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            url = read_url(proc)
        except AssertionError:
            if proc.wait(timeout=5) == 77:
                pytest.skip("this kernel has no PR_SET_MDWE")
            raise
        wait_until(lambda: mode(url) == "ACTIVE")  # pollers and the KIE client are loaded
        assert httpx.post(f"{url}/callbacks/kie", content=b"{}", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v1/jobs", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=SHUTDOWN_GRACE_S + 5)
        log = proc.stderr.read()  # type: ignore[union-attr]
        stop(proc)
    assert rc == 0, log
    assert "Traceback" not in log


def test_sigterm_during_a_burst_of_callbacks_loses_none(tmp_path):
    proc = kied("serve", "--port", "0", env={"KIED_LOG_FORMAT": "json"}, cwd=tmp_path)
    log: list[str] = []
    exited_at: list[float] = []

    def drain() -> None:  # a full pipe would stall kied's logging
        assert proc.stderr is not None
        log.extend(proc.stderr)

    def watch() -> None:
        proc.wait()
        exited_at.append(time.monotonic())

    threading.Thread(target=drain, daemon=True).start()
    try:
        wait_until(lambda: any("listening on" in line for line in log))
        url = re.search(r"listening on (http://[^\s\"]+)", "".join(log)).group(1)  # type: ignore[union-attr]
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        threading.Thread(target=watch, daemon=True).start()

        def post(i: int) -> tuple[int, int | None, object]:
            body = json.dumps(
                {
                    "code": 200,
                    "msg": "success",
                    "data": {
                        "taskId": f"burst-{i}",
                        "state": "success",
                        "resultJson": json.dumps({"resultUrls": [f"https://x/{i}.png"]}),
                        "padding": "x" * 800,
                    },
                }
            )
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(
                    "POST",
                    "/callbacks/kie",
                    body=body,
                    headers={"Content-Type": "application/json"},
                )
                answer = conn.getresponse()
                data = answer.read()
                return i, answer.status, json.loads(data) if answer.status == 200 else data
            except (OSError, http.client.HTTPException) as exc:
                return i, None, repr(exc)
            finally:
                conn.close()

        results: list[tuple[int, int | None, object]] = []
        signalled_at = None
        answered_before_signal = 0
        with ThreadPoolExecutor(max_workers=100) as pool:
            futures = [pool.submit(post, i) for i in range(300)]
            for future in as_completed(futures):
                results.append(future.result())
                if signalled_at is None and len(results) == 60:
                    proc.send_signal(signal.SIGTERM)
                    signalled_at = time.monotonic()
                    answered_before_signal = len(results)
        proc.wait(timeout=SHUTDOWN_GRACE_S + 10)
    finally:
        stop(proc)
    assert signalled_at is not None
    assert answered_before_signal < 300
    assert proc.returncode == 0
    wait_until(lambda: exited_at, within_s=5)
    exit_s = exited_at[0] - signalled_at
    assert exit_s < SHUTDOWN_GRACE_S

    answered = {i: body for i, status, body in results if status == 200}
    assert len(answered) >= 60
    # 200 means recorded: "stored": false would be a callback KIE will not send again.
    assert all(isinstance(b, dict) and b["stored"] is True for b in answered.values())
    with sqlite3.connect(tmp_path / "var" / "kied.db") as db:
        recorded = {row[0] for row in db.execute("SELECT task_id FROM callback_inbox")}
    missing = {f"burst-{i}" for i in answered} - recorded
    assert not missing, f"answered 200 but not in the inbox: {sorted(missing)}"

    # KIED_LOG_FORMAT=json: every line one object, with kied's extra fields.
    entries = [json.loads(line) for line in log if line.strip()]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any("[HTTP] listening on" in e["message"] for e in entries)
    logged = {e.get("task_id") for e in entries if e.get("action") == "callback"}
    assert {f"burst-{i}" for i in answered} <= logged
    assert not any("exception" in e for e in entries), [e for e in entries if "exception" in e]
    failures = Counter(str(body).split("(")[0] for _, status, body in results if status != 200)
    print(
        f"\nSIGTERM -> exit {exit_s:.3f} s; {len(answered)} of 300 answered 200,"
        f" {answered_before_signal} before the signal; all {len(answered)} in the inbox;"
        f" {len(recorded)} recorded in all; not answered: {dict(failures)}",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------ Render


def test_render_blueprint_validates_and_fits_kied():
    doc = yaml.safe_load((REPO / "render.yaml").read_text())
    schema = json.loads((FIXTURES / "schemas" / "render-blueprint.schema.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(doc), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)

    databases = {db["name"] for db in doc.get("databases", [])}
    (web,) = [s for s in doc["services"] if s["type"] == "web"]
    env = {v["key"]: v for v in web["envVars"]}
    # Every reference to a database names one in this file.
    references = [
        v["fromDatabase"]["name"]
        for s in doc["services"]
        for v in s.get("envVars", [])
        if "fromDatabase" in v
    ]
    assert references
    assert set(references) <= databases
    assert env["DATABASE_URL"]["fromDatabase"]["property"] == "connectionString"

    assert web["runtime"] == "python"
    assert web["healthCheckPath"] == "/healthz"
    assert web["maxShutdownDelaySeconds"] > SHUTDOWN_GRACE_S
    # The commands are the ones the README documents.
    render = readme_section("Deploy on Render")
    assert f"`{web['startCommand']}`" in render
    assert f"`{web['buildCommand']}`" in render
    assert web["startCommand"] == "kied serve"

    # No secret has a literal value: each is asked for, generated, or taken from the database.
    assert env["KIE_API_KEY"] == {"key": "KIE_API_KEY", "sync": False}
    for key in ("KIED_CALLBACK_TOKEN", "KIED_API_TOKEN"):
        assert env[key] == {"key": key, "generateValue": True}
    for key, var in env.items():
        if re.search(r"KEY|TOKEN|SECRET|PASSWORD|DATABASE_URL", key):
            assert "value" not in var, key
            assert "previewValue" not in var, key
    assert re.fullmatch(r"3\.11\.\d+", str(env["PYTHON_VERSION"]["value"]))

    # What Render will hand kied is accepted: PostgreSQL storage and the advisory lock.
    environ = {
        key: str(var.get("value", "secret"))
        for key, var in env.items()
        if "fromDatabase" not in var
    }
    environ |= {
        "DATABASE_URL": "postgresql://kied:secret@dpg-xyz-a/kied",
        "PORT": "10000",
        "RENDER": "true",
        "RENDER_EXTERNAL_URL": "https://kied.onrender.com",
    }
    settings = load_settings(environ, pid=1)
    assert isinstance(settings.store, PostgresStoreSettings)
    assert isinstance(settings.lock, PgLockSettings)
    assert (settings.host, settings.port) == ("0.0.0.0", 10000)
    assert settings.public_url == "https://kied.onrender.com"
