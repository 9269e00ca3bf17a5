"""Unauthenticated 1 MiB callbacks against a daemon that requires a callback token.

    python bench/hostile.py [--callbacks 1000] [--connections 8] [--size 1048576]

Starts ``kied serve`` on a SQLite database of its own with KIED_CALLBACK_TOKEN set, sends
``--callbacks`` POST /callbacks/kie bodies of ``--size`` bytes without the token, and
reports every answer's status, the time taken, how much the database file grew (and the
WAL's size), and what /metrics counted as stored and dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import trio
from _common import PYTHON, base_env, compile_project, free_port, start_and_wait, stop


def file_bytes(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def send_all(port: int, count: int, connections: int, body: bytes) -> dict[int, int]:
    codes: dict[int, int] = {}
    send, receive = trio.open_memory_channel[int](count)
    for i in range(count):
        send.send_nowait(i)
    send.close()
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
    ) as http:

        async def worker() -> None:
            async for i in receive:
                r = await http.post(
                    f"/callbacks/kie?job=j-{i}",
                    content=body,
                    headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
                )
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(worker)
    return codes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbacks", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--daemon-src", help="run the kied of another checkout, to compare")
    args = parser.parse_args()
    compile_project()
    body = b'{"data":{"taskId":"t-hostile","state":"success"},"pad":"'
    body += b"x" * (args.size - len(body) - 2) + b'"}'
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "kied.db"
        port = free_port()
        env = {**base_env(), "KIED_CALLBACK_TOKEN": "bench-token", "PORT": str(port)}
        cmd = [PYTHON, "-m", "kied", "serve", "--port", str(port), "--database", str(db)]
        if args.daemon_src:
            run = "import sys; sys.path.insert(0, sys.argv.pop(1)); import runpy;"
            run += " runpy.run_module('kied', run_name='__main__')"
            cmd = [PYTHON, "-c", run, args.daemon_src, *cmd[3:]]
        proc, _ = start_and_wait(cmd, port, env, log=Path(tmp) / "kied.log")
        try:
            while not db.exists():
                time.sleep(0.05)
            time.sleep(0.5)  # migrations done
            wal = db.with_name(db.name + "-wal")
            before = file_bytes(db)
            started = time.perf_counter()
            codes = trio.run(send_all, port, args.callbacks, args.connections, body)
            took = time.perf_counter() - started
            scrape = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            after = file_bytes(db)
            wal_after = file_bytes(wal)
        finally:
            stop(proc)
        print(
            json.dumps(
                {
                    "callbacks": args.callbacks,
                    "body_bytes": len(body),
                    "answers": {str(k): v for k, v in sorted(codes.items())},
                    "seconds": round(took, 2),
                    "sent_mib_per_s": round(args.callbacks * len(body) / took / 2**20, 1),
                    "db_bytes_before": before,
                    "db_bytes_after": after,
                    "db_growth_mib": round((after - before) / 2**20, 3),
                    "wal_bytes_after": wal_after,
                    "stored": metric(scrape, "kied_callbacks_by_auth_total"),
                    "dropped": metric(scrape, "kied_callbacks_dropped_total"),
                    "cpu_count": os.cpu_count(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
