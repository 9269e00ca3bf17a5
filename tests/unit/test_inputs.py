from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kied.core.inputs import MAX_DEPTH, json_problem, read_json, text_problem, visible


def test_text_problems_are_nul_and_lone_surrogates():
    assert text_problem("plain é 🙂") is None
    assert text_problem("a\x00b") == "must not contain NUL (\\u0000)"
    assert text_problem("a\udfffb") == "must not contain a lone surrogate (\\udfff)"


def test_visible_writes_escapes_for_what_no_text_column_takes():
    assert visible("job-1") == "job-1"
    assert visible("a\x00b\ud800") == "a\\x00b\\ud800"
    assert text_problem(visible("\x00\udc00")) is None


def test_read_json_reads_json_and_refuses_the_rest():
    assert read_json(b'{"a": [1, NaN]}')["a"][0] == 1
    with pytest.raises(ValueError, match="must be JSON"):
        read_json(b"\xff{")
    with pytest.raises(ValueError, match="must be JSON"):
        read_json(b"")
    with pytest.raises(ValueError, match="nested too deeply"):
        read_json(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    ("value", "at", "found"),
    [
        ({"a": {"b": [1, "x", None, True]}}, "", None),
        ({"a": {"b": [1, "\ud800"]}}, "", ("a.b[1]", "lone surrogate")),
        ({"a": {"b\x00": 1}}, "", ("a.b\\x00", "NUL")),
        ({"a": float("nan")}, "body", ("body.a", "NaN")),
        ([float("-inf")], "input", ("input[0]", "Infinity")),
        ("\x00", "model", ("model", "NUL")),
        ({"m": [[[]]] * 2, "n": "ok"}, "", None),
    ],
)
def test_json_problem_names_the_first_place(value, at, found):
    problem = json_problem(value, at=at)
    if found is None:
        assert problem is None
    else:
        assert problem is not None
        assert problem[0] == found[0]
        assert found[1] in problem[1]


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_nesting_is_bounded_and_named_by_the_outermost_place():
    assert json_problem(nested(MAX_DEPTH), at="") is None
    assert json_problem({"metadata": nested(MAX_DEPTH)}, at="") == (
        "metadata",
        f"nested too deeply (at most {MAX_DEPTH} levels)",
    )
    assert json_problem([nested(MAX_DEPTH)], at="")[0] == "[0]"
    assert json_problem(nested(MAX_DEPTH + 1), at="input")[0] == "input"
    assert json_problem([[nested(MAX_DEPTH)]], at="")[0] == "[0]"


odd_text = st.text(alphabet=st.characters(exclude_categories=()) | st.sampled_from("\x00\ud800"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | odd_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(odd_text, children, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=MAX_DEPTH + 2))
def test_a_problem_is_named_exactly_when_there_is_one(value, wrap):
    for _ in range(wrap):
        value = [value]
    strings = []
    stack = [(value, 0)]
    bad = False
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list | dict):
            bad = bad or depth >= MAX_DEPTH
            children = list(node.values()) if isinstance(node, dict) else node
            strings.extend(node if isinstance(node, dict) else [])
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, str):
            strings.append(node)
        elif isinstance(node, float) and not math.isfinite(node):
            bad = True
    expected = bad or any(text_problem(s) for s in strings)
    assert (json_problem(value, at="body") is not None) == expected
