"""Time from exec to the first 200 on /healthz: kied beside the bare stack, same run.

    python bench/startup.py [--runs 15]

Runs are interleaved (bare, kied, kied with the lock held elsewhere, ...), so a slow
moment of the machine falls on all three alike. Also reports SIGTERM → exit.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import tempfile
from pathlib import Path

from _common import (
    PYTHON,
    REPO,
    base_env,
    compile_project,
    free_port,
    start_and_wait,
    stop,
    summary,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    compile_project()
    times: dict[str, list[float]] = {"bare": [], "kied": [], "kied (lock held elsewhere)": []}
    stops: dict[str, list[float]] = {name: [] for name in times}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "kied.db"
        lock_path = Path(tmp) / "kied.db.lock"
        for _ in range(args.runs):
            for name in times:
                port = free_port()
                env = base_env()
                if name == "bare":
                    cmd = [PYTHON, str(REPO / "bench" / "_bare_app.py"), str(port)]
                else:
                    cmd = [PYTHON, "-m", "kied", "serve", "--port", str(port)]
                    env["KIED_DATABASE_URL"] = str(db)
                holder = None
                if name.startswith("kied (lock"):
                    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT)
                    fcntl.flock(holder, fcntl.LOCK_EX)
                try:
                    proc, took = start_and_wait(cmd, port, env)
                    times[name].append(took)
                    stops[name].append(stop(proc))
                finally:
                    if holder is not None:
                        os.close(holder)
    floor = summary(times["bare"])["median"]
    report = {}
    for name, values in times.items():
        s = summary(values)
        report[name] = {
            "exec_to_200_ms": {k: round(v * 1000, 1) if k != "n" else v for k, v in s.items()},
            "ratio_to_floor": round(s["median"] / floor, 3),
            "sigterm_to_exit_ms_median": round(summary(stops[name])["median"] * 1000, 1),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
