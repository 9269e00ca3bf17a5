"""Callbacks per second and ack latency, kied (durable SQLite writes) beside the bare stack.

    python bench/callbacks.py [--rounds 3] [--duration 10] [--connections 50]

Needs wrk (Debian package ``wrk``). Each request is a ~1 KB Market success callback
with its own task id; kied answers only after the inbox row is committed. Rounds are
interleaved (bare, kied, bare, kied, ...) and medians reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, REPO, base_env, compile_project, free_port, start_and_wait, stop

LUA = r"""
local counter = 0
local pad = string.rep("p", 600)
request = function()
  counter = counter + 1
  local id = string.format("%08x%08x", math.random(0, 0x7fffffff), counter)
  local body = '{"code":200,"msg":"Playground task completed successfully.","data":{"taskId":"'
    .. id .. '","model":"google/nano-banana","state":"success","param":"{\\"prompt\\":\\"' .. pad
    .. '\\"}","resultJson":"{\\"resultUrls\\":[\\"https://cdn.example.test/' .. id
    .. '.png\\"]}","failCode":null,"failMsg":null,"costTime":9}}'
  return wrk.format("POST", "/callbacks/kie", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, errors, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(port: int, duration: int, connections: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/callbacks/kie",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    return {
        "req_s": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": r["errors"],
        "requests": r["requests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/callbacks.py needs wrk: apt-get install wrk")
    compile_project()
    results: dict[str, list[dict[str, float]]] = {"bare": [], "kied": []}
    stored: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(LUA)
        for round_no in range(args.rounds):
            for name in results:
                port = free_port()
                env = base_env()
                if name == "bare":
                    cmd = [PYTHON, str(REPO / "bench" / "_bare_app.py"), str(port)]
                else:
                    db = Path(tmp) / f"kied-{round_no}.db"
                    env["KIED_DATABASE_URL"] = str(db)
                    env["KIED_LOG_LEVEL"] = "WARNING"
                    cmd = [PYTHON, "-m", "kied", "serve", "--port", str(port)]
                log = Path(tmp) / f"{name}-{round_no}.log"
                proc, _ = start_and_wait(cmd, port, env, log=log)
                try:
                    time.sleep(0.5)  # storage and lock settle
                    warm = run_wrk(port, 2, args.connections, script)
                    run = run_wrk(port, args.duration, args.connections, script)
                    run["sent"] = warm["requests"] + run["requests"]
                    results[name].append(run)
                    if run["requests"] == 0:
                        print(
                            f"{name} round {round_no}: no requests answered; log:", file=sys.stderr
                        )
                        print(log.read_text(), file=sys.stderr)
                finally:
                    stop(proc)
                if name == "kied":
                    stored.append(_count_inbox(db))
    report = {}
    for name, runs in results.items():
        report[name] = {
            key: round(statistics.median(r[key] for r in runs), 2)
            for key in ("req_s", "p50_ms", "p99_ms")
        }
        report[name]["errors"] = sum(int(r["errors"]) for r in runs)
        report[name]["runs_req_s"] = [round(r["req_s"], 1) for r in runs]
    report["kied"]["ratio_to_floor"] = round(report["kied"]["req_s"] / report["bare"]["req_s"], 3)
    # every answered callback must be in the inbox (a request cut off by wrk's stop may add one)
    report["kied"]["inbox_rows_vs_answered"] = [
        (rows, int(run["sent"])) for rows, run in zip(stored, results["kied"], strict=True)
    ]
    print(json.dumps(report, indent=2))


def _count_inbox(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM callback_inbox").fetchone()[0])


if __name__ == "__main__":
    main()
