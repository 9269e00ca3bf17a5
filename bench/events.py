"""Job events reaching the application: webhook latency, a receiver down, stream resumes.

    python bench/events.py [--jobs 500] [--resumes 100] [--down-jobs 200]

(a) Latency, real processes: `kied simulate` and `kied serve` (SQLite) with
    KIED_WEBHOOK_URL pointing at a receiving HTTP server in this process, which verifies
    every delivery with the reference ``standardwebhooks`` package. JOBS tasks are created
    at the simulator with kied's callback URL and tracked through `POST /v1/jobs`
    (`task_id`), so KIE's createTask rate limit does not pace the run; tasks take 15-25 s,
    so that every job is tracked before its task calls back. Measured per job:
    the simulator sending the task's callback → the receiver holding the verified
    ``job.succeeded`` event (wall clock, one machine), p50/p99/max.
(b) Resume: from RESUMES random cursors of the event log, page `GET /v1/events` to its
    end; every page sequence must be exactly the log after that cursor: no gap, no repeat.
(c) A receiver down for 10 minutes of virtual time, then back (in one process, the
    autojump clock, MemoryStore): every event delivered, none lost; attempts per delivery.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from standardwebhooks import Webhook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.procs import free_port, kied, mode, read_url, stop, wait_until  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"kied-bench-webhook-key-01234567").decode()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def receiver() -> tuple[ThreadingHTTPServer, dict[str, float], list[str]]:
    arrived: dict[str, float] = {}  # job id -> when its verified job.succeeded arrived
    refused: list[str] = []
    hook = Webhook(SECRET)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                payload = hook.verify(body, {k: v for k, v in self.headers.items()})
            except Exception as exc:
                refused.append(str(exc))
                self.send_response(400)
                self.end_headers()
                return
            now = time.time()
            if payload["type"] == "job.succeeded":
                with lock:
                    arrived.setdefault(payload["data"]["task_id"], now)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, arrived, refused


def latency_and_resume(jobs: int, resumes: int) -> None:
    server, arrived, refused = receiver()
    sim = kied("simulate", "--port", "0", "--duration", "15-25", "--seed", "21")
    sim_url = read_url(sim, stream="stdout")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        daemon = kied(
            "serve",
            "--port",
            str(port),
            "--database",
            str(Path(tmp) / "kied.db"),
            env={
                "KIE_BASE_URL": sim_url,
                "KIE_API_KEY": "k",
                "KIED_PUBLIC_URL": url,
                "KIED_WEBHOOK_URL": f"http://127.0.0.1:{server.server_address[1]}/hooks",
                "KIED_WEBHOOK_SECRET": SECRET,
                "KIED_LOG_LEVEL": "INFO",
            },
        )
        try:
            read_url(daemon)
            # nobody reads the log: keep its pipe from filling up and stopping the daemon
            threading.Thread(target=lambda: daemon.stderr.read(), daemon=True).start()
            threading.Thread(target=lambda: sim.stdout.read(), daemon=True).start()
            wait_until(lambda: mode(url) == "ACTIVE")
            with httpx.Client(timeout=10) as http:
                tasks = []
                for i in range(jobs):
                    r = http.post(
                        f"{sim_url}/api/v1/jobs/createTask",
                        json={
                            "model": "m",
                            "callBackUrl": f"{url}/callbacks/kie",
                            "input": {"prompt": f"p{i}"},
                        },
                        headers={"Authorization": "Bearer k"},
                    )
                    tasks.append(r.json()["data"]["taskId"])
                for task_id in tasks:
                    r = http.post(f"{url}/v1/jobs", json={"family": "market", "task_id": task_id})
                    assert r.status_code == 201, r.text
                wait_until(lambda: len(arrived) >= jobs, within_s=120, interval=0.2)
                stats = http.get(f"{sim_url}/_sim/stats").json()["tasks"]
                lags = [
                    (arrived[t] - stats[t]["callback_first_sent_at"]) * 1000
                    for t in tasks
                    if stats[t]["callback_first_sent_at"] is not None
                ]
                print(
                    f"(a) {len(lags)} jobs: KIE's callback sent -> verified job.succeeded at the"
                    f" receiver: p50 {statistics.median(lags):.1f} ms, p99 {pct(lags, 99):.1f} ms,"
                    f" max {max(lags):.1f} ms; refused deliveries {len(refused)}"
                )
                everything = []
                after = 0
                while True:
                    page = http.get(f"{url}/v1/events", params={"after": after, "limit": 1000})
                    page.raise_for_status()
                    body = page.json()
                    if not body["events"]:
                        break
                    everything.extend(e["cursor"] for e in body["events"])
                    after = body["next_cursor"]
                rng = random.Random(5)
                bad = 0
                for _ in range(resumes):
                    start = rng.choice([0, *everything])
                    seen: list[int] = []
                    after = start
                    while True:
                        body = http.get(
                            f"{url}/v1/events",
                            params={"after": after, "limit": rng.randint(1, 200)},
                        ).json()
                        if not body["events"]:
                            break
                        seen.extend(e["cursor"] for e in body["events"])
                        after = body["next_cursor"]
                    if seen != [c for c in everything if c > start]:
                        bad += 1
                print(
                    f"(b) {resumes} resumes from random cursors of a log of {len(everything)}"
                    f" events: {resumes - bad} exact (no gap, no repeat), {bad} wrong"
                )
        finally:
            stop(daemon, signal.SIGTERM)
            stop(sim)
            server.shutdown()


def receiver_down(jobs: int) -> None:
    from kied.store import DeliveryState
    from tests.integration.test_pollers import open_stack, sim_config
    from tests.integration.test_webhooks import KEY, Receiver

    logging.disable(logging.WARNING)  # the attempts that fail while it is down

    async def main() -> None:
        hooks = Receiver(mode={"http://app.test/hooks": "down"})
        with tempfile.TemporaryDirectory() as tmp:
            async with open_stack(
                Path(tmp),
                sim_config(duration_s=(30.0, 300.0)),
                webhook_transport=hooks.transport(),
                webhook_urls=("http://app.test/hooks",),
                webhook_keys=(KEY,),
                webhook_events=frozenset({"job.created", "job.submitted", "job.succeeded"}),
            ) as stack:
                ids = [(await stack.submit())["id"] for _ in range(jobs)]
                for job_id in ids:
                    await stack.wait_terminal(job_id)
                await trio.sleep(600)
                down_until = trio.current_time()
                hooks.mode["http://app.test/hooks"] = "up"
                await trio.sleep(2 * 3600)
                deliveries = await stack.store.list_deliveries(limit=100_000)
                events = await stack.store.list_events(limit=100_000)
                states: dict[Any, int] = {}
                for d in deliveries:
                    states[d.state] = states.get(d.state, 0) + 1
                attempts = [d.attempts for d in deliveries]
                got = {r["headers"]["webhook-id"] for _, r, _ in hooks.got}
                last = max(t for _, _, t in hooks.got)
                print(
                    f"(c) {jobs} jobs, {len(events)} events, receiver down until 600 s after the"
                    f" last job ended ({down_until:.0f} s of virtual time):"
                    f" {len(got)} distinct events received,"
                    f" {states.get(DeliveryState.DELIVERED, 0)} deliveries delivered,"
                    f" {states.get(DeliveryState.PENDING, 0)} pending,"
                    f" {states.get(DeliveryState.FAILED, 0)} failed; attempts per delivery"
                    f" {min(attempts)}-{max(attempts)} (mean {statistics.fmean(attempts):.1f});"
                    f" last delivered {last - down_until:.0f} s after the receiver came back"
                )
                assert got == {e.id for e in events}, "an event was lost"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--resumes", type=int, default=100)
    parser.add_argument("--down-jobs", type=int, default=200)
    args = parser.parse_args()
    latency_and_resume(args.jobs, args.resumes)
    receiver_down(args.down_jobs)
    print(json.dumps({"jobs": args.jobs, "resumes": args.resumes, "down_jobs": args.down_jobs}))


if __name__ == "__main__":
    main()
