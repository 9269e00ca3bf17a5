"""``GET /metrics``: what the daemon counts, read as Prometheus reads it.

The first tests drive the real daemon over HTTP and parse the scrape with the client
library's own parser; the others run kied's services, pollers and the KIE simulator in one
process under the autojump clock (as tests/integration/test_pollers.py does) and read the
daemon's registry directly.
"""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kied import __version__
from kied.changes import JobChanges
from kied.core.jobs import EndedBy, JobState
from kied.core.schedule import CallbackHealth
from kied.daemon import Daemon
from kied.errors import StoreUnavailableError
from kied.intake import CallbackIntake, RawCallback
from kied.metrics import Metrics
from kied.settings import NoLockSettings
from kied.testing import MemoryStore
from kied.web import create_app
from tests.conftest import wait_for
from tests.integration.test_daemon import LockHolder, add_job, market_callback
from tests.integration.test_pollers import FlakyCreate, open_stack, sim_config
from tests.integration.test_pollers import settings as stack_settings

TOKEN = "s3cret"
API_TOKEN = "api-s3cret"


class Scrape:
    """One parsed ``/metrics`` answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[frozenset[tuple[str, str]], float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name][frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[name][frozenset(labels.items())]

    def by(self, name: str, label: str) -> dict[str, float]:
        """The samples of ``name`` that have only ``label``, by its value."""
        return {
            dict(key)[label]: value
            for key, value in self.samples[name].items()
            if {k for k, _ in key} == {label}
        }


async def scrape(http: httpx.AsyncClient) -> Scrape:
    r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


OVERSIZED = b'{"pad":"' + b"x" * (1024 * 1024 + 10) + b'"}'
GOOD = {"X-KIE-Callback-Token": TOKEN}
GENERATING = json.dumps(
    {"code": 200, "msg": "", "data": {"taskId": "t-guard", "state": "generating"}}
)

# (path, body, headers, (outcome, auth, effect)) for each callback sent, in order.
CALLBACKS: list[tuple[str, bytes, dict[str, str], tuple[str, str, str]]] = [
    (f"/callbacks/kie?token={TOKEN}", market_callback("t-ok"), {}, ("success", "token", "changed")),
    ("/callbacks/kie", market_callback("t-fail", ok=False), GOOD, ("fail", "token", "changed")),
    ("/callbacks/kie", market_callback("t-ok"), GOOD, ("success", "token", "no-op")),
    ("/callbacks/kie", market_callback("t-guard"), {}, ("success", "rejected", "rejected")),
    (
        "/callbacks/kie?token=nope",
        market_callback("t-guard"),
        {},
        ("success", "rejected", "rejected"),
    ),
    ("/callbacks/kie", GENERATING.encode(), GOOD, ("pending", "token", "changed")),
    ("/callbacks/kie", b"{not json", GOOD, ("unknown", "token", "not applicable")),
    ("/callbacks/kie", market_callback("t-later"), GOOD, ("success", "token", "no job")),
    ("/callbacks/kie", b"", {}, ("unknown", "rejected", "rejected")),
    ("/callbacks/kie", OVERSIZED, GOOD, ("unknown", "token", "not applicable")),
    ("/callbacks/kie/", market_callback("t-fail"), {}, ("success", "rejected", "rejected")),
]


def _tally(index: int) -> dict[str, int]:
    """What CALLBACKS expect, by outcome (0), authentication (1) or effect (2)."""
    counts: dict[str, int] = defaultdict(int)
    for *_, expected in CALLBACKS:
        counts[expected[index]] += 1
    return dict(counts)


def _nonzero(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if v}


async def test_callbacks_and_job_ends_are_counted_exactly(settings, start_daemon):
    for job_id, task_id in [
        ("j-ok", "t-ok"),
        ("j-fail", "t-fail"),
        ("j-guard", "t-guard"),
        ("j-cancel", "t-cancel"),
    ]:
        await add_job(settings, job_id, task_id)
    daemon = await start_daemon(settings, callback_token=TOKEN, api_token=API_TOKEN)
    api = {"Authorization": f"Bearer {API_TOKEN}"}
    async with daemon.client() as http:
        await wait_for(lambda: _ready(http))
        for path, body, headers, _ in CALLBACKS:
            r = await http.post(path, content=body, headers=headers)
            assert r.status_code == 200
            assert r.json()["stored"] is True
        # The callback for t-later came first: storing its job ends it, by callback.
        r = await http.post(
            "/v1/jobs", json={"family": "market", "task_id": "t-later"}, headers=api
        )
        assert r.status_code == 201
        assert r.json()["state"] == "succeeded"
        r = await http.delete("/v1/jobs/j-cancel", headers=api)
        assert r.status_code == 200
        # Repeats change nothing, so they count nothing.
        assert (await http.delete("/v1/jobs/j-cancel", headers=api)).status_code == 409
        r = await http.post(
            "/v1/jobs", json={"family": "market", "task_id": "t-later"}, headers=api
        )
        assert r.status_code == 200

        m = await scrape(http)  # no API token: operators' scrapers do not carry one

        responses = m.by("kied_callback_responses_total", "code")
        assert responses["200"] == len(CALLBACKS)
        assert all(v == 0 for code, v in responses.items() if code != "200")
        assert m.types["kied_callback_responses"] == "counter"

        outcomes = m.by("kied_callbacks_by_outcome_total", "outcome")
        assert outcomes == {"success": 6, "fail": 1, "pending": 1, "unknown": 3}
        assert _nonzero(outcomes) == _tally(0)
        auth = m.by("kied_callbacks_by_auth_total", "auth")
        assert auth == {"open": 0, "token": 7, "hmac": 0, "token+hmac": 0, "rejected": 4}
        assert _nonzero(auth) == _tally(1)
        effects = m.by("kied_callbacks_by_effect_total", "effect")
        assert effects == {
            "changed": 3,
            "no-op": 1,
            "no job": 1,
            "rejected": 4,
            "not applicable": 2,
            "other task": 0,
            "to confirm": 0,
        }
        assert _nonzero(effects) == _tally(2)
        assert m.value("kied_callbacks_unstored_total") == 0

        ended = {
            (dict(k)["state"], dict(k)["ended_by"]): v
            for k, v in m.samples["kied_jobs_ended_total"].items()
        }
        assert {k: v for k, v in ended.items() if v} == {
            ("succeeded", "callback"): 2,  # j-ok, and the job for t-later
            ("failed", "callback"): 1,
            ("cancelled", "cancel"): 1,
        }
        durations = m.by("kied_job_duration_seconds_count", "ended_by")
        assert durations == {
            "callback": 3,
            "callback_confirmed": 0,
            "poll": 0,
            "submit": 0,
            "deadline": 0,
            "cancel": 1,
        }
        assert m.types["kied_job_duration_seconds"] == "histogram"

        assert m.value("kied_build_info", version=__version__) == 1
        assert 0 < m.value("kied_start_to_listen_seconds") < 3600

        async def leading() -> Scrape | None:
            m = await scrape(http)
            return m if m.value("kied_mode", mode="ACTIVE") == 1 else None

        m = await wait_for(leading)
        assert m.value("kied_mode", mode="PASSIVE") == 0
        assert m.value("kied_lock_acquisitions_total") == 1
        assert m.value("kied_lock_losses_total") == 0

        async def one_poller() -> bool:
            # j-guard is the one job still pending
            return (await scrape(http)).value("kied_pollers") == 1

        await wait_for(one_poller)
    await daemon.shutdown()


async def test_a_passive_instance_reports_its_mode(settings, start_daemon):
    holder = LockHolder(settings.lock.path)
    try:
        daemon = await start_daemon(settings)
        async with daemon.client() as http:
            m = await scrape(http)
            assert m.value("kied_mode", mode="PASSIVE") == 1
            assert m.value("kied_mode", mode="ACTIVE") == 0
            assert m.value("kied_lock_acquisitions_total") == 0
            assert m.value("kied_pollers") == 0
        await daemon.shutdown()
    finally:
        holder.release()


@pytest.mark.slow
async def test_a_lost_lock_is_counted_and_taken_again(settings, start_daemon):
    daemon = await start_daemon(settings)
    async with daemon.client() as http:

        async def acquisitions(n: int) -> Scrape | None:
            m = await scrape(http)
            return m if m.value("kied_lock_acquisitions_total") == n else None

        await wait_for(lambda: acquisitions(1))
        settings.lock.path.unlink()  # the lock file removed: the leader steps down
        m = await wait_for(lambda: acquisitions(2))
        assert m.value("kied_lock_losses_total") == 1
        assert m.value("kied_mode", mode="ACTIVE") == 1
    await daemon.shutdown()


# ----------------------------------------------- in one process, under the autojump clock


def sample(daemon: Daemon, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def jobs_ended(daemon: Daemon) -> dict[tuple[str, str], float]:
    """The non-zero ``kied_jobs_ended_total`` series, by (state, ended_by)."""
    found = {}
    for family in daemon.metrics.registry.collect():
        for s in family.samples:
            if s.name == "kied_jobs_ended_total" and s.value:
                found[(s.labels["state"], s.labels["ended_by"])] = s.value
    return found


def status_queries(daemon: Daemon) -> dict[str, float]:
    found = {}
    for family in daemon.metrics.registry.collect():
        for s in family.samples:
            if s.name == "kied_status_queries_total" and s.value:
                found[s.labels["result"]] = s.value
    return found


KIE_SAYS = {JobState.SUCCEEDED: "success", JobState.FAILED: "fail"}


@pytest.mark.parametrize(
    ("faults", "state", "ended_by", "duration_s"),
    [
        ({}, JobState.SUCCEEDED, EndedBy.CALLBACK, 60.0),
        ({"duplicate_callbacks": 1.0}, JobState.SUCCEEDED, EndedBy.CALLBACK, 60.0),
        ({"drop_callbacks": 1.0}, JobState.SUCCEEDED, EndedBy.POLL, None),
        ({"drop_callbacks": 1.0, "fail_rate": 1.0}, JobState.FAILED, EndedBy.POLL, None),
        ({"stuck": 1.0}, JobState.TIMED_OUT, EndedBy.DEADLINE, 900.0),
    ],
)
async def test_each_job_end_is_counted_once_with_its_labels(
    tmp_path, autojump_clock, faults, state, ended_by, duration_s
):
    async with open_stack(tmp_path, sim_config(**faults)) as stack:
        job = await stack.submit()
        done = await stack.wait_terminal(job["id"])
        await trio.sleep(120)  # duplicates and late pollers have had their chance
        daemon = stack.daemon
        assert (done.state, done.ended_by) == (state, ended_by)
        assert jobs_ended(daemon) == {(state.value, ended_by.value): 1}
        # The same change heard again (as a PostgreSQL notification echoes it) is not an end.
        daemon.changes.seen(done)
        daemon.changes.seen(done)
        assert jobs_ended(daemon) == {(state.value, ended_by.value): 1}

        labels = {"ended_by": ended_by.value}
        assert sample(daemon, "kied_job_duration_seconds_count", **labels) == 1
        took = sample(daemon, "kied_job_duration_seconds_sum", **labels)
        assert took == pytest.approx(done.ended_at - done.created_at)
        if duration_s is not None:
            assert took == pytest.approx(duration_s, abs=0.01)
        assert sample(daemon, "kied_create_task_calls_total", result="created") == 1

        # Every status query the simulator saw was counted, by what KIE said.
        sent = (await stack.stats(done.task_id))["status_queries"]
        queries = status_queries(daemon)
        assert sum(queries.values()) == sent
        if ended_by is EndedBy.POLL:
            # the last query found the outcome
            assert queries[KIE_SAYS[done.state]] == 1
        if ended_by is EndedBy.DEADLINE:
            assert set(queries) == {"pending"}
            assert queries["pending"] == sent > 0
        if faults.get("duplicate_callbacks"):
            assert sample(daemon, "kied_callbacks_by_effect_total", effect="changed") == 1
            assert sample(daemon, "kied_callbacks_by_effect_total", effect="no-op") == 1
        assert sample(daemon, "kied_pollers") == 0


async def test_busy_and_refusing_kie_are_counted_by_result(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(drop_callbacks=1.0, status_errors=0.6)) as stack:
        jobs = [await stack.submit() for _ in range(5)]
        done = [await stack.wait_terminal(j["id"]) for j in jobs]
        daemon = stack.daemon
        queries = status_queries(daemon)
        sent = sum([(await stack.stats(d.task_id))["status_queries"] for d in done])
        assert sum(queries.values()) == sent
        assert queries["busy"] > 0
        assert queries["success"] == 5
        assert queries == daemon._supervisor.status_queries  # type: ignore[union-attr]
        assert jobs_ended(daemon) == {("succeeded", "poll"): 5}

    async with open_stack(tmp_path, sim_config(), kie_api_key=None) as stack:
        done = await stack.wait_terminal((await stack.submit())["id"], within_s=60)
        assert done.ended_by is EndedBy.SUBMIT
        assert sample(stack.daemon, "kied_create_task_calls_total", result="rejected") == 1
        assert sample(stack.daemon, "kied_create_task_calls_total", result="created") == 0
        assert jobs_ended(stack.daemon) == {("failed", "submit"): 1}
        assert sample(stack.daemon, "kied_job_duration_seconds_count", ended_by="submit") == 1

    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        flaky = FlakyCreate(stack.daemon._kie_transport, failures=3)  # type: ignore[arg-type]
        stack.daemon._kie_transport = flaky
        stack.lead()
        await stack.wait_terminal((await stack.submit())["id"])
        assert sample(stack.daemon, "kied_create_task_calls_total", result="busy") == 3
        assert sample(stack.daemon, "kied_create_task_calls_total", result="created") == 1


class CallbackFirst(httpx.AsyncBaseTransport):
    """KIE's API, but each task's callback is handed to ``callbacks`` before createTask's
    answer comes back; ``job_id`` says whether it carries kied's job id from its URL."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, callbacks: CallbackIntake, *, job_id: bool
    ) -> None:
        self.inner = inner
        self.callbacks = callbacks
        self.job_id = job_id
        self.effects: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/createTask"):
            return response
        body = await response.aread()
        task_id = json.loads(body)["data"]["taskId"]
        callback_url = httpx.URL(json.loads(request.content)["callBackUrl"])
        callback = market_callback(task_id)
        receipt = await self.callbacks.handle(
            RawCallback(
                body=callback,
                body_size=len(callback),
                oversized=False,
                query_string=callback_url.query.decode() if self.job_id else "",
                headers={},
                content_type="application/json",
                remote="127.0.0.1",
            )
        )
        assert receipt.record is not None
        self.effects.append(receipt.record.effect.value)
        return httpx.Response(response.status_code, headers=response.headers, content=body)


@pytest.mark.parametrize(
    ("where", "job_id", "first_effect"),
    [
        # No job matches it yet: attaching the task id applies it, and that ends the job.
        ("here", False, "no job"),
        # It names the job: it ends the job (and cancels the poller) before the attach.
        ("here", True, "changed"),
        # Another instance on the same storage ends the job; the attach finds it ended.
        ("elsewhere", True, "changed"),
    ],
)
async def test_a_callback_before_createtask_answers_is_counted_once(
    tmp_path, autojump_clock, where, job_id, first_effect
):
    async with open_stack(tmp_path, sim_config(), lead=False) as stack:
        daemon = stack.daemon
        other = Metrics()
        callbacks = daemon.callbacks
        if where == "elsewhere":
            # Its own clock, a little behind; its own counts.
            callbacks = CallbackIntake(
                daemon.settings,
                store=daemon.store,
                now=lambda: daemon.now() - 0.25,
                metrics=other,
                changes=JobChanges(metrics=other, health=CallbackHealth(), now=daemon.now),
            )
        first = CallbackFirst(daemon._kie_transport, callbacks, job_id=job_id)  # type: ignore[arg-type]
        daemon._kie_transport = first
        stack.lead()
        done = await stack.wait_terminal((await stack.submit())["id"])
        await trio.sleep(120)  # the simulator's own callback comes, and changes nothing
        assert first.effects == [first_effect]
        assert (done.state, done.ended_by) == (JobState.SUCCEEDED, EndedBy.CALLBACK)
        one_end = {("succeeded", "callback"): 1}
        if where == "here":
            assert jobs_ended(daemon) == one_end
        else:
            assert jobs_ended(daemon) == {}
            assert (
                other.registry.get_sample_value(
                    "kied_jobs_ended_total", {"state": "succeeded", "ended_by": "callback"}
                )
                == 1
            )
        assert sample(daemon, "kied_create_task_calls_total", result="created") == 1


async def test_pollers_are_counted_while_they_run(tmp_path, autojump_clock):
    async with open_stack(tmp_path, sim_config(stuck=1.0)) as stack:
        for _ in range(3):
            await stack.submit()
        await trio.sleep(10)
        assert sample(stack.daemon, "kied_pollers") == 3
        stack.step_down()
        await trio.sleep(1)
        assert sample(stack.daemon, "kied_pollers") == 0


class UnwritableStore(MemoryStore):
    async def record_callback(self, entry, report):
        raise StoreUnavailableError("disk full")


async def test_a_callback_that_cannot_be_stored_is_answered_200_and_counted(tmp_path):
    config = stack_settings(tmp_path, lock=NoLockSettings())
    daemon = Daemon(config, store=UnwritableStore())
    app = create_app(callbacks=daemon.callbacks, jobs=daemon.jobs, status=daemon, settings=config)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://kied.test") as http:
        r = await http.post("/callbacks/kie", content=market_callback("t-1"))
        assert r.status_code == 200
        assert r.json()["stored"] is False
        r = await http.post("/callbacks/kie", content=b"")
        assert r.status_code == 200
        m = await scrape(http)
    assert m.value("kied_callback_responses_total", code="200") == 2
    assert m.value("kied_callbacks_unstored_total") == 2
    assert sum(m.by("kied_callbacks_by_outcome_total", "outcome").values()) == 0
    assert jobs_ended(daemon) == {}
