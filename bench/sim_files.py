"""How fast ``kied simulate`` serves result files: MB/s over real sockets, and its CPU time.

Starts ``kied simulate`` as a process, creates ``--files`` tasks, then downloads one result file
per task (``--concurrency`` at a time) with httpx, checking each body's length against its
``Content-Length``. Prints JSON: bytes, seconds, MB/s (10^6 bytes), and the simulator's CPU
seconds per GB served.

    .venv/bin/python bench/sim_files.py --files 200 --size 1M-20M --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx
import trio
from _common import PYTHON, base_env, free_port, start_and_wait, stop

AUTH = {"Authorization": "Bearer bench"}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _download(api: httpx.AsyncClient, urls: list[str], concurrency: int) -> int:
    total = 0
    limiter = trio.CapacityLimiter(concurrency)

    async def one(url: str) -> None:
        nonlocal total
        async with limiter, api.stream("GET", url) as r:
            r.raise_for_status()
            n = 0
            async for chunk in r.aiter_raw():
                n += len(chunk)
            assert n == int(r.headers["content-length"]), url
            total += n

    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(one, url)
    return total


async def _run(base: str, files: int, concurrency: int, name: str) -> tuple[int, float]:
    limits = httpx.Limits(max_connections=concurrency)
    timeout = httpx.Timeout(60.0)
    async with httpx.AsyncClient(
        base_url=base, headers=AUTH, limits=limits, timeout=timeout, trust_env=False
    ) as api:
        urls = []
        for _ in range(files):
            r = await api.post(
                "/api/v1/jobs/createTask", json={"model": "bench/model", "input": {"prompt": "x"}}
            )
            urls.append(f"/_sim/files/{r.json()['data']['taskId']}/{name}")
        t0 = time.perf_counter()
        total = await _download(api, urls, concurrency)
        return total, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", default="1M-20M", help="kied simulate --file-size")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--name", default="0.png", help="file name (its extension picks the type)")
    args = p.parse_args()
    port = free_port()
    cmd = [PYTHON, "-m", "kied", "simulate", "--port", str(port), "--duration", "0"]
    cmd += ["--file-size", args.size, "--log-level", "warning"]
    proc, _ = start_and_wait(cmd, port, base_env())
    try:
        cpu0 = _cpu_s(proc.pid)
        total, seconds = trio.run(
            _run, f"http://127.0.0.1:{port}", args.files, args.concurrency, args.name
        )
        cpu = _cpu_s(proc.pid) - cpu0
    finally:
        stop(proc)
    print(
        json.dumps(
            {
                "files": args.files,
                "size": args.size,
                "name": args.name,
                "concurrency": args.concurrency,
                "bytes": total,
                "seconds": round(seconds, 3),
                "mb_per_s": round(total / seconds / 1e6, 1),
                "simulator_cpu_s_per_gb": round(cpu / (total / 1e9), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
