"""Odd input never gets a 500: NUL, lone surrogates, NaN and deep nesting, on both databases.

The API answers 400 naming the field; a callback is answered 200 and kept, with what no
text column takes written as visible escapes. The real daemon on 127.0.0.1:0, over HTTP.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from kied.kie.simulator import SimulatorConfig, serve_simulator
from kied.settings import PostgresStoreSettings
from kied.store import open_store

TOKEN = "api-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request, settings):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return replace(settings, store=PostgresStoreSettings(url=url))
    return settings


@pytest.fixture
async def daemon(store_settings, start_daemon, nursery):
    # Jobs the API takes go to kied's simulator, never to KIE.
    sim_url = await nursery.start(serve_simulator, SimulatorConfig(port=0, seed=1))
    daemon = await start_daemon(
        store_settings, kie_base_url=sim_url, api_token=TOKEN, callback_token="cb-secret"
    )
    yield daemon
    # Stopped while the simulator still answers: no createTask is cut off mid-request.
    await daemon.shutdown()


@pytest.fixture
def failures(caplog):
    """Log records at ERROR or with a traceback: none may appear."""
    caplog.set_level(logging.INFO)

    def found() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info is not None
        ]

    return found


def escaped(text: str) -> str:
    """``text`` percent-encoded as UTF-8, lone surrogates too (as a careless client would)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


# ---------------------------------------------------------------- POST /v1/jobs bodies

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "field", "detail"),
    [
        (b'{"model": "m\\ud800", "input": {}}', "model", "lone surrogate"),
        (b'{"model": "m\\u0000", "input": {}}', "model", "NUL"),
        (b'{"model": "m", "input": {}, "idempotency_key": "k\\udfff"}', "idempotency_key", "lone"),
        (b'{"model": "m", "input": {}, "idempotency_key": "k\\u0000"}', "idempotency_key", "NUL"),
        (b'{"task_id": "t\\ud800"}', "task_id", "lone surrogate"),
        (b'{"task_id": "a\\u0000b"}', "task_id", "NUL"),
        (b'{"model": "m", "input": {"p": ["x", "\\ud800"]}}', "input.p[1]", "lone surrogate"),
        (b'{"model": "m", "input": {"p": "\\u0000"}}', "input.p", "NUL"),
        (b'{"model": "m", "input": {}, "metadata": {"k": "\\ud800"}}', "metadata.k", "lone"),
        (b'{"model": "m", "input": {}, "metadata": {"k\\u0000": 1}}', "metadata.k\\x00", "NUL"),
        (b'{"model": "m", "input": {}, "metadata": {"k": NaN}}', "metadata.k", "NaN"),
        (b'{"model": "m", "input": {"n": -Infinity}}', "input.n", "Infinity"),
        (b'{"model": "m", "input": {}, "metadata": {"k": ' + DEEP + b"}}", "body", "nested"),
        (b'{"model": "m", "input": ' + b'{"a":' * 65 + b"1" + b"}" * 65 + b"}", "input", "nested"),
        (DEEP, "body", "nested too deeply"),
        (b"\xff\xfe{", "body", "JSON"),
    ],
)
async def test_a_job_request_with_odd_text_is_a_400_naming_the_field(
    daemon, failures, body, field, detail
):
    async with daemon.client() as http:
        r = await http.post("/v1/jobs", content=body, headers=JSON)
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field
        assert detail in r.json()["detail"]
        # Nothing was stored.
        assert (await http.get("/v1/jobs", headers=AUTH)).json()["jobs"] == []
    assert failures() == []


async def test_nesting_up_to_the_bound_is_taken(daemon, failures):
    nested = b'{"a":' * 63 + b"1" + b"}" * 63
    async with daemon.client() as http:
        r = await http.post(
            "/v1/jobs", content=b'{"model": "m", "input": ' + nested + b"}", headers=JSON
        )
        assert r.status_code == 201, r.text
    assert failures() == []


# ------------------------------------------------------------- paths and query arguments


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("GET", "/v1/jobs/a%00b", "job_id"),
        ("GET", "/v1/jobs/a%00b?wait=0.1", "job_id"),
        ("DELETE", "/v1/jobs/a%00b", "job_id"),
        ("GET", "/v1/jobs/a%00b/callbacks", "job_id"),
        ("GET", "/v1/jobs?state=%00", "state"),
        ("GET", "/v1/jobs?metadata.k=a%00", "metadata.k"),
        ("GET", "/v1/jobs?metadata.k%00=a", "metadata.k\\x00"),
        ("GET", "/v1/events?after=%00", "after"),
        ("GET", "/v1/events?after=%ED%A0%80", "after"),
        ("GET", "/v1/deliveries?event_id=evt_%00", "event_id"),
        ("GET", "/v1/deliveries?state=%00", "state"),
        ("GET", "/v1/deliveries?since=%00", "since"),
    ],
)
async def test_odd_text_in_a_path_or_query_is_a_400_naming_it(
    daemon, failures, method, path, field
):
    async with daemon.client() as http:
        r = await http.request(method, path, headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field
    assert failures() == []


async def test_a_surrogate_in_a_path_is_read_as_a_replacement_character(daemon, failures):
    async with daemon.client() as http:
        r = await http.get("/v1/jobs/%ED%A0%80", headers=AUTH)
        assert r.status_code == 404, r.text
        r = await http.get("/v1/jobs", params={"metadata.k": "\ufffd"}, headers=AUTH)
        assert r.status_code == 200, r.text
    assert failures() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"event_id": "evt_\\u0000"}', "event_id"),
        (b'{"event_id": "evt_\\ud800"}', "event_id"),
        (b'{"failed_since": NaN}', "failed_since"),
        (DEEP, "body"),
    ],
)
async def test_a_redelivery_with_odd_text_is_a_400(daemon, failures, body, field):
    async with daemon.client() as http:
        r = await http.post("/v1/deliveries/redeliver", content=body, headers=JSON)
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field
    assert failures() == []


# ------------------------------------------------------------------------- callbacks


CALLBACK = b'{"code": 200, "data": {"taskId": "t\\u0000\\ud800", "state": "success"}}'


@pytest.mark.parametrize(
    ("query", "body", "job_id"),
    [
        ("job=a%00b", CALLBACK, "a\\x00b"),
        ("job=%ED%A0%80", CALLBACK, "\ufffd" * 3),
        ("job=%00&%00=%00", b"\x00\xff" + CALLBACK, "\\x00"),
    ],
)
async def test_a_callback_with_odd_text_is_kept_with_visible_escapes(
    daemon, failures, store_settings, query, body, job_id
):
    async with daemon.client() as http:
        r = await http.post(
            f"/callbacks/kie?{query}&token=cb-secret",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["stored"] is True, r.text
    inbox_id = r.json()["id"]
    await daemon.shutdown()
    async with open_store(store_settings.store) as store:
        (kept,) = await store.list_callbacks(job_id=job_id)
    assert kept.id == inbox_id
    assert kept.entry.body == body  # the bytes as sent
    assert "\x00" not in kept.entry.query
    assert failures() == []


@pytest.mark.parametrize("key", ["x\\u0000", "x\\ud800"])
async def test_a_callback_whose_task_id_sits_under_an_odd_key_is_kept_and_applied(
    daemon, failures, key
):
    async with daemon.client() as http:
        r = await http.post("/v1/jobs", json={"task_id": "task-1", "model": "m"}, headers=AUTH)
        job_id = r.json()["id"]
        body = f'{{"code": 200, "data": {{"{key}": {{"taskId": "task-1", "state": "success"}}}}}}'
        r = await http.post("/callbacks/kie?token=cb-secret", content=body.encode())
        assert r.json()["stored"] is True, r.text
        (kept,) = (await http.get(f"/v1/jobs/{job_id}/callbacks", headers=AUTH)).json()["callbacks"]
        assert kept["found_by"] == f"data.{key.replace('u0000', 'x00')}.taskId"
        assert kept["effect"] == "changed"
        assert (await http.get(f"/v1/jobs/{job_id}", headers=AUTH)).json()["state"] == "succeeded"
    assert failures() == []


# ----------------------------------------------------------------- any input at all

odd_chars = st.sampled_from(["\x00", "\ud800", "\udfff", "\ufffd", "%", "&", "=", "/", "."])
odd_text = st.text(
    alphabet=st.characters(exclude_categories=()) | odd_chars, max_size=12
) | st.sampled_from(["", "NaN", "0", "-1", "1e999", "succeeded", "pending", "evt_1"])
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities too
    | odd_text
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(odd_text, children, max_size=3)
    ),
    max_leaves=12,
)
job_fields = st.sampled_from(
    ["model", "family", "input", "task_id", "timeout_s", "idempotency_key", "metadata", "x"]
)


def dumps(value: object) -> bytes:
    # ensure_ascii writes lone surrogates as \udxxx escapes, as a client's JSON may.
    return json.dumps(value, ensure_ascii=True).encode()


# Jobs kied may well take, with odd (and sometimes unstorable) text in them.
jobs = st.fixed_dictionaries(
    {"model": st.just("google/nano-banana"), "input": st.dictionaries(odd_text, json_values)},
    optional={
        "metadata": st.dictionaries(odd_text, json_values, max_size=3),
        "idempotency_key": odd_text,
    },
).map(dumps)
bodies = (
    jobs
    | st.dictionaries(job_fields, json_values, max_size=5).map(dumps)
    | json_values.map(dumps)
    | st.binary(max_size=40)
    | st.integers(min_value=60, max_value=3000).map(lambda n: b'{"input":' + b"[" * n)
)


kie_keys = st.sampled_from(
    ["taskId", "recordId", "state", "failMsg", "failCode", "resultJson", "resultUrls", "info"]
)
# KIE's shapes, with odd keys and values where kied looks.
callback_bodies = st.fixed_dictionaries(
    {
        "code": st.just(200) | json_values,
        "data": st.dictionaries(
            kie_keys | odd_text,
            json_values | st.dictionaries(kie_keys | odd_text, json_values, max_size=4),
            max_size=5,
        ),
    }
).map(dumps)


Request = tuple[str, str, bytes]  # method, path and query, body


@st.composite
def requests(draw: st.DrawFn) -> Request:
    text = draw(odd_text)
    other = draw(odd_text)
    route = draw(st.integers(min_value=0, max_value=8))
    if route == 0:
        return "POST", "/v1/jobs", draw(bodies)
    if route == 1:
        method = draw(st.sampled_from(["GET", "DELETE"]))
        return method, f"/v1/jobs/{escaped(text) or 'x'}", b""
    if route == 2:
        return "GET", f"/v1/jobs/{escaped(text) or 'x'}/callbacks", b""
    if route == 3:
        return (
            "GET",
            f"/v1/jobs?state={escaped(text)}&metadata.{escaped(other)}={escaped(text)}",
            b"",
        )
    if route == 4:
        return "GET", f"/v1/events?after={escaped(text)}&limit={escaped(other)}", b""
    if route == 5:
        args = f"state={escaped(text)}&event_id={escaped(other)}&since={escaped(text)}"
        return "GET", f"/v1/deliveries?{args}", b""
    if route == 6:
        body = draw(
            st.dictionaries(st.sampled_from(["event_id", "failed_since"]), json_values).map(dumps)
            | bodies
        )
        return "POST", "/v1/deliveries/redeliver", body
    query = f"job={escaped(text)}&{escaped(other)}={escaped(text)}&token=cb-secret"
    return "POST", f"/callbacks/kie?{query}", draw(callback_bodies | bodies)


def drawn(strategy: st.SearchStrategy[Request], count: int) -> list[Request]:
    """``count`` examples of ``strategy``, as hypothesis draws them (edge cases first).

    Drawn before they are sent, with the event loop held: trio's scheduler keeps a random
    generator hypothesis watches, and it must not move while hypothesis draws.
    """
    found: list[Request] = []

    @hypothesis_settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Request) -> None:
        found.append(value)

    collect()
    return found


async def test_no_input_ever_gets_a_500_or_a_traceback(daemon, failures):
    statuses: list[int] = []
    async with daemon.client() as http:
        for method, path, body in drawn(requests(), 150):
            r = await http.request(method, path, content=body, headers=JSON)
            statuses.append(r.status_code)
            assert r.status_code < 500, (method, path, body, r.text)
            if path.startswith("/callbacks/"):
                assert r.status_code == 200
                assert r.json()["stored"] is True, (path, body)
    assert failures() == []
    assert 400 in statuses
