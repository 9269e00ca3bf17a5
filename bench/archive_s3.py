"""Upload throughput of kied's S3 archive backend to a local S3-compatible server (moto).

Starts ``python -m moto.server`` on a free port, makes a bucket, writes a file of ``--size``
MiB, and uploads it ``--rounds`` times through ``S3Backend.put`` (multipart from
``--threshold`` MiB). Prints JSON: MB/s (10^6 bytes) per round and the median. moto keeps
objects in memory and is itself Python, so this measures kied's side plus moto's, on one
machine: a floor, not what a real store gives.

    .venv/bin/python bench/archive_s3.py --size 20 --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import trio
from _common import PYTHON, free_port

from kied.archive import open_s3_backend

MIB = 1024 * 1024
KEY_ID, SECRET = "bench-key", "bench-secret"


async def _rounds(
    endpoint: str, source: Path, sha: str, size: int, rounds: int, threshold: int
) -> list[float]:
    rates = []
    async with open_s3_backend(
        bucket="kied-bench",
        prefix="bench",
        endpoint_url=endpoint,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        multipart_threshold=threshold * MIB,
        multipart_chunksize=max(5, threshold) * MIB,
    ) as s3:
        for n in range(rounds):
            t0 = time.perf_counter()
            await s3.put(f"job-{n}/0.mp4", source, content_type="video/mp4", sha256=sha, size=size)
            rates.append(size / (time.perf_counter() - t0) / 1e6)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=20, help="file size in MiB")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threshold", type=int, default=16, help="multipart threshold in MiB")
    args = p.parse_args()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/data.json", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        ).create_bucket(Bucket="kied-bench")
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "file"
            data = os.urandom(args.size * MIB)
            source.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            rates = trio.run(_rounds, endpoint, source, sha, len(data), args.rounds, args.threshold)
    finally:
        proc.terminate()
        proc.wait()
    print(
        json.dumps(
            {
                "size_mib": args.size,
                "multipart_threshold_mib": args.threshold,
                "rounds": [round(r, 1) for r in rates],
                "median_mb_per_s": round(statistics.median(rates), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
