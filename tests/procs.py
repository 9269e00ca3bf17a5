"""Real `kied` processes for tests: start, read the URL they print, stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

PYTHON = sys.executable
_OWN_SETTINGS = ("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kied(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, **kw: object
) -> subprocess.Popen[str]:
    """``python -m kied ARGS`` with none of the caller's kied settings, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_SETTINGS)}
    base.update(env or {})
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [PYTHON, "-m", "kied", *args],
        env=base,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def read_url(proc: subprocess.Popen[str], *, stream: str = "stderr", within_s: float = 20) -> str:
    """The first ``http://…`` URL the process announces as listening."""
    pipe = getattr(proc, stream)
    deadline = time.monotonic() + within_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no URL announced: {seen}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, within_s: float = 15) -> int:
    """Signal the process, wait for it and close its pipes; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=within_s)
    finally:
        for pipe in (proc.stdout, proc.stderr, proc.stdin):
            if pipe is not None:
                pipe.close()


def wait_until(
    predicate: Callable[[], object], *, within_s: float = 20, interval: float = 0.05
) -> object:
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s")
        time.sleep(interval)


def mode(url: str) -> str | None:
    """An instance's mode, or None when it does not answer."""
    try:
        return str(httpx.get(f"{url}/healthz", timeout=1).json()["mode"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None
