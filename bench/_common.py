"""Helpers shared by the benchmarks: free ports, process start-up, raw-socket health checks."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthz_ok(port: int) -> bool:
    """One raw GET /healthz; True on a 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def start_and_wait(
    cmd: list[str], port: int, env: dict[str, str], timeout: float = 30.0, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Start ``cmd``; return the process and the seconds from exec to the first 200 on /healthz."""
    out = subprocess.DEVNULL if log is None else log.open("ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
    if log is not None:
        out.close()
    while not healthz_ok(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"{cmd} did not answer /healthz in {timeout} s")
        time.sleep(0.002)
    return proc, time.perf_counter() - t0


def stop(proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM; seconds until the process exited."""
    t0 = time.perf_counter()
    proc.terminate()
    proc.wait(timeout=30)
    return time.perf_counter() - t0


def base_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KIED_", "KIE_", "PORT", "DATABASE_URL", "RENDER"))
    }


def compile_project() -> None:
    """Byte-compile kied, so that no run pays for compiling it (PYTHONDONTWRITEBYTECODE may be set)."""
    subprocess.run(
        [PYTHON, "-m", "compileall", "-q", str(REPO / "kied"), str(REPO / "bench")], check=True
    )


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "n": len(values)}
