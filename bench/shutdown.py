"""SIGTERM → exit of a real ``kied serve`` while clients hold idle keep-alive connections.

    python bench/shutdown.py [--runs 5] [--connections 50]

Each run starts ``kied serve`` (SQLite in a temporary directory), opens ``--connections``
HTTP/1.1 connections that each send one ``GET /healthz`` (keep-alive), read the answer and
stay open, then sends SIGTERM and times the exit. Prints JSON with p50 and max in ms.
``main(argv)`` returns that report, so other benchmarks can run it as one of their parts.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, base_env, compile_project, free_port, start_and_wait

if TYPE_CHECKING:
    from collections.abc import Sequence

_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


def _idle_connection(port: int) -> socket.socket:
    """A connection that has had one full keep-alive answer and is now idle."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(_REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the server closed a keep-alive connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:80]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return sock


def one_run(connections: int, directory: Path) -> float:
    """Seconds from SIGTERM to exit with ``connections`` idle keep-alive connections."""
    port = free_port()
    env = base_env()
    env["KIED_DATABASE_URL"] = str(directory / "kied.db")
    cmd = [PYTHON, "-m", "kied", "serve", "--port", str(port)]
    proc, _ = start_and_wait(cmd, port, env, log=directory / "kied.log")
    socks: list[socket.socket] = []
    try:
        socks = [_idle_connection(port) for _ in range(connections)]
        time.sleep(0.2)  # every connection idle, as a client pool would leave it
        t0 = time.perf_counter()
        proc.terminate()
        proc.wait(timeout=60)
        took = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for sock in socks:
            sock.close()
    if proc.returncode != 0:
        raise RuntimeError(f"kied serve exited with {proc.returncode}")
    return took


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench/shutdown.py")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args(argv)
    compile_project()
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            directory = Path(tmp) / f"run{i}"
            directory.mkdir()
            times.append(one_run(args.connections, directory))
    report: dict[str, Any] = {
        "connections": args.connections,
        "runs": args.runs,
        "sigterm_to_exit_ms": {
            "p50": round(statistics.median(times) * 1000, 1),
            "max": round(max(times) * 1000, 1),
            "all": [round(t * 1000, 1) for t in times],
        },
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
