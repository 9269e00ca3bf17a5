"""`kied` as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import FIXTURES, PYTHON

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow


def kied(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, **kw):
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER"))
    }
    full_env.update(env or {})
    return subprocess.Popen(
        [PYTHON, "-m", "kied", *args],
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


class Served:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"\[HTTP\] listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                return
        raise AssertionError(f"kied serve did not start: {self.lines}")

    def rest(self) -> str:
        """Everything the process logged; closes its pipes."""
        assert self.proc.stderr is not None
        assert self.proc.stdout is not None
        text = "".join(self.lines) + self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc.stdout.close()
        return text


def test_bad_setting_stops_serve_with_one_line_naming_it(tmp_path):
    proc = kied("serve", env={"PORT": "eighty"}, cwd=tmp_path)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().splitlines() == ["kied: PORT: must be a port number 0-65535, not 'eighty'"]
    assert not (tmp_path / "var").exists()  # nothing was created before validation


def test_serve_help_lists_the_settings(tmp_path):
    proc = kied("serve", "--help", cwd=tmp_path)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    for name in (
        "PORT",
        "KIED_HOST",
        "KIED_DATABASE_URL",
        "DATABASE_URL",
        "KIED_LOCK",
        "KIED_CALLBACK_TOKEN",
        "KIE_WEBHOOK_HMAC_KEY",
        "KIE_API_KEY",
        "KIE_BASE_URL",
        "KIED_PUBLIC_URL",
        "KIED_STATUS_QUERIES_PER_S",
        "KIED_JOB_TIMEOUT",
    ):
        assert name in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_on_defaults_then_stops_cleanly_on_a_signal(tmp_path, sig):
    served = Served(kied("serve", "--port", "0", cwd=tmp_path))
    try:
        r = httpx.get(served.url + "/healthz", timeout=5)
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while httpx.get(served.url + "/healthz", timeout=5).json()["mode"] != "ACTIVE":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(served.url + "/callbacks/kie", content=b"{}", timeout=5)
        assert r.status_code == 200
    finally:
        served.proc.send_signal(sig)
        started = time.monotonic()
        served.proc.wait(timeout=15)
    assert served.proc.returncode == 0
    assert time.monotonic() - started < 10
    log = served.rest()
    assert "Traceback" not in log
    assert (tmp_path / "var" / "kied.db").exists()
    assert (tmp_path / "var" / "kied.db.lock").exists()


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = kied("serve", "--port", str(port), "--lock", "none", cwd=tmp_path)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"kied: cannot serve on 127.0.0.1:{port}" in err.strip().splitlines()[-1]


def test_inspect_callback_prints_what_kied_makes_of_a_body(tmp_path):
    proc = kied("inspect-callback", str(FIXTURES / "callbacks" / "market-success.json"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["task_id"] == "3f9a1c7e5b2d48e09a6c1f4b7d2e8a51"
    assert result["found_by"] == "data.taskId"
    assert result["outcome"] == "success"
    assert result["result_urls"] == ["https://tempfile.example-cdn.test/images/3f9a1c7e_0.png"]

    proc = kied("inspect-callback", "-", stdin=subprocess.PIPE)
    out, _ = proc.communicate(b"\xff not json".decode("latin-1"), timeout=30)
    assert proc.returncode == 0
    assert json.loads(out)["outcome"] == "unknown"

    proc = kied("inspect-callback", str(tmp_path / "missing.json"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1
