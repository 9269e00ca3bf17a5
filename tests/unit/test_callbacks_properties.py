from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kied.core import _extract
from kied.core.callbacks import (
    CallbackOutcome,
    Outcome,
    ParseLimits,
    Unrecognised,
    parse_callback,
    result_to_json,
)
from kied.core.families import Family, read_status

MODEST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=60,
)
# Keys and values that kied looks for, so the walk meets them often.
kie_keys = st.sampled_from(
    [
        "code",
        "msg",
        "message",
        "data",
        "taskId",
        "task_id",
        "recordId",
        "id",
        "state",
        "status",
        "successFlag",
        "callbackType",
        "failCode",
        "failMsg",
        "errorCode",
        "errorMessage",
        "resultJson",
        "resultUrls",
        "result_urls",
        "info",
        "response",
        "param",
        "promptJson",
        "images",
        "video_url",
        "audio_url",
    ]
)
kie_scalars = json_scalars | st.sampled_from(
    [
        200,
        501,
        "200",
        "success",
        "fail",
        "generating",
        "SUCCESS",
        "CALLBACK_EXCEPTION",
        "text",
        "first",
        "complete",
        "error",
        0,
        1,
        2,
        3,
        4,
        "https://cdn.test/a.png",
        "[http://cdn.test/b.mp4]",
        '{"taskId":"embedded"}',
        '{"resultUrls":["https://cdn.test/c.png"]}',
    ]
)
kie_values = st.recursive(
    kie_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(kie_keys, children, max_size=6)
    ),
    max_leaves=60,
)
side_maps = st.none() | st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=4)


def assert_well_formed(result: CallbackOutcome | Unrecognised) -> None:
    assert isinstance(result, CallbackOutcome | Unrecognised)
    assert isinstance(result.outcome, Outcome)
    assert len(set(result.result_urls)) == len(result.result_urls)
    for url in result.result_urls:
        assert url.lower().startswith(("http://", "https://"))
    if isinstance(result, CallbackOutcome):
        assert 0 < len(result.task_id) <= 200
        assert result.task_id == result.task_id.strip()
        assert result.task_id.isprintable()
        assert result.family is None or result.family in {f.value for f in Family}
    # Whatever was read can be written out as UTF-8 JSON.
    json.dumps(result_to_json(result), allow_nan=False).encode("utf-8")


@MODEST
@given(st.binary(max_size=2000), side_maps, side_maps, st.none() | st.text(max_size=40))
def test_arbitrary_bytes_never_raise(body, query, headers, content_type):
    result = parse_callback(body, query=query, headers=headers, content_type=content_type)
    assert_well_formed(result)


@MODEST
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=500))
def test_arbitrary_text_never_raises(text):
    # Includes lone surrogates, written the only way they reach the wire.
    result = parse_callback(text.encode("utf-8", "surrogatepass"))
    assert_well_formed(result)


@MODEST
@given(json_values)
def test_arbitrary_json_never_raises(value):
    assert_well_formed(parse_callback(json.dumps(value).encode()))
    # The same value sent as a JSON string, and as a form field.
    assert_well_formed(parse_callback(json.dumps(json.dumps(value)).encode()))
    assert_well_formed(
        parse_callback(
            b"data=" + json.dumps(value).encode(), content_type="application/x-www-form-urlencoded"
        )
    )


@MODEST
@given(kie_values)
def test_kie_shaped_json_never_raises(value):
    assert_well_formed(parse_callback(json.dumps(value).encode()))


@MODEST
@given(kie_values, st.sampled_from(list(Family)))
def test_read_status_never_raises(value, family):
    reading = read_status(family, value)
    assert isinstance(reading.outcome, Outcome)
    assert len(set(reading.result_urls)) == len(reading.result_urls)


task_ids = st.text(
    alphabet=st.characters(categories=["L", "N"], include_characters="-_.:"),
    min_size=1,
    max_size=64,
)


@MODEST
@given(task_ids, kie_values, st.sampled_from(["taskId", "task_id"]))
def test_a_task_id_at_data_is_always_found(task_id, noise, key):
    body = {"code": 200, "data": {key: task_id, "noise": noise}}
    result = parse_callback(json.dumps(body).encode())
    assert isinstance(result, CallbackOutcome)
    assert (result.task_id, result.found_by) == (task_id, f"data.{key}")


@MODEST
@given(kie_values)
def test_parsing_is_deterministic(value):
    body = json.dumps(value).encode()
    assert parse_callback(body) == parse_callback(body)


# -- bounded work -------------------------------------------------------------------------

LIMITS = ParseLimits(max_depth=16, max_nodes=500, max_embedded=2)


def _deep(depth: int, leaf: object, key: str) -> object:
    value = leaf
    for _ in range(depth):
        value = {key: value} if key else [value]
    return value


adversarial = st.builds(
    lambda depth, width, key, embed: {
        "wide": list(range(width)),
        "deep": _deep(depth, {"taskId": "buried"}, key),
        "strings": [json.dumps({"taskId": "s", "x": list(range(width % 50))})] * (width % 30),
        "embedded": json.dumps(json.dumps(json.dumps({"taskId": "e"}))) if embed else None,
    },
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=0, max_value=5000),
    st.sampled_from(["a", "data", ""]),
    st.booleans(),
)


@MODEST
@given(adversarial)
def test_the_walk_never_exceeds_its_node_budget(value):
    found = _extract.scan(
        value,
        max_depth=LIMITS.max_depth,
        max_nodes=LIMITS.max_nodes,
        max_embedded=LIMITS.max_embedded,
    )
    assert found.visited <= LIMITS.max_nodes
    assert len(found.objects) <= LIMITS.max_nodes
    assert all(node.depth <= LIMITS.max_depth for node in found.objects)
    assert all(node.level <= LIMITS.max_embedded for node in found.objects)
    assert_well_formed(parse_callback(json.dumps(value).encode(), limits=LIMITS))


@MODEST
@given(st.integers(min_value=1, max_value=2000), st.integers(min_value=0, max_value=20))
def test_work_is_capped_however_wide_the_body(budget, extra):
    width = budget + 1 + extra * 1000
    found = _extract.scan({"a": list(range(width)), "b": {"c": "x" * width}}, max_nodes=budget)
    assert found.visited == budget
    assert found.exhausted


@MODEST
@given(st.integers(min_value=65, max_value=900))
def test_nesting_beyond_max_depth_is_not_examined(depth):
    found = _extract.scan(_deep(depth, {"taskId": "buried"}, "a"))
    assert max(node.depth for node in found.objects) == _extract.MAX_DEPTH
    assert not [hit for node in found.objects for hit in node.get("taskid")]
