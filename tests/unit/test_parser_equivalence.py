"""The parser's walk against a plain reference walk, and its lazy reading of request echoes.

``scan`` is written for speed: object shapes are cached, values are charged to the budget in
bulk where nothing can run it out part-way, the task id is picked during the walk, and (for
the callback parser) JSON text inside request echoes is decoded only when something asks for
it. The reference here is the walk written the plain way: every value charged as it is met,
every object's keys sorted on the spot. Both must agree on every value, for every budget.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kied.core import _extract, callbacks
from kied.core.callbacks import ParseLimits, parse_callback, result_to_json
from tests.conftest import FIXTURES

SAMPLES = sorted((FIXTURES / "callbacks").glob("*.json"))

MODEST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the reference walk -------------------------------------------------------------------

URL_KEYS = [
    "resulturls",
    "resulturl",
    "resultvideourl",
    "resultimageurl",
    "videourl",
    "audiourl",
    "audiowavurl",
    "vocalremovalinfo",
    "images",
    "imageurls",
    "fullresulturls",
    "resultwatermarkurls",
    "firstframeurl",
    "lastframeurl",
    "resultobject",
    "instruments",
    "streamaudiourl",
    "imageurl",
    "originurls",
    "originimageurl",
]
ECHO_KEYS = {"param", "paramjson", "promptjson", "generateparam", "input"}
FIELD_KEYS = {
    "taskid",
    "recordid",
    "id",
    "code",
    "msg",
    "message",
    "state",
    "status",
    "successflag",
    "callbacktype",
    "failcode",
    "failmsg",
    "failmessage",
    "errorcode",
    "errormessage",
    "errormsg",
    "tasktype",
    "model",
    "videourl",
}
URL_IN_TEXT = re.compile(r"https?://[^\s\[\]\"'<>,]+", re.IGNORECASE)


def ref_norm(key: str) -> str:
    return "" if len(key) > 64 else key.lower().replace("_", "").replace("-", "")


def ref_loads(text: str) -> object:
    plain = json.JSONDecoder(parse_constant=lambda _: None)
    try:
        return plain.decode(text)
    except json.JSONDecodeError:
        raise
    except ValueError:
        careful = json.JSONDecoder(
            parse_int=lambda t: int(t) if len(t) <= 1000 else None,
            parse_constant=lambda _: None,
        )
        return careful.decode(text)


def ref_decode(text: str, allow_string: bool) -> tuple[bool, object]:
    text = text.strip()
    if not text or text[0] not in ('{["' if allow_string else "{["):
        return False, None
    try:
        return True, ref_loads(text)
    except (ValueError, RecursionError):
        return False, None


def ref_is_url(text: str) -> bool:
    if len(text) > 8192:
        return False
    head = text[:8].lower()
    rest = text[8:] if head == "https://" else text[7:] if head.startswith("http://") else ""
    return bool(rest) and text.isprintable() and " " not in text


def ref_urls_in(text: str) -> list[str]:
    text = text.strip()
    if ref_is_url(text):
        return [text]
    if not text.startswith("["):
        return []
    return [m.group() for m in URL_IN_TEXT.finditer(text) if ref_is_url(m.group())]


@dataclass(eq=False)
class RefNode:
    value: object
    parent: RefNode | None
    key: str | None
    index: int | None
    embedded: bool
    depth: int
    level: int
    zone: str
    order: tuple[int, ...]
    fields: list[tuple[str, str, object]] = field(default_factory=list)


class RefWalk:
    def __init__(self, max_depth: int, max_nodes: int, max_embedded: int) -> None:
        self.max_depth, self.max_nodes, self.max_embedded = max_depth, max_nodes, max_embedded
        self.queue: deque[RefNode] = deque()
        self.objects: list[RefNode] = []
        self.urls: list[tuple[tuple[int, ...], str]] = []
        self.keys: set[str] = set()
        self.raw_keys: set[str] = set()
        self.containers = self.visited = 0
        self.exhausted = False

    def tick(self) -> bool:
        if self.visited >= self.max_nodes:
            self.exhausted = True
            return False
        self.visited += 1
        return True

    def run(self, root: object) -> RefWalk:
        if self.tick():
            value, level = root, 0
            while isinstance(value, str) and level < self.max_embedded:
                ok, decoded = ref_decode(value, allow_string=True)
                if not ok:
                    break
                value, level = decoded, level + 1
            self.place(value, None, None, None, 0, level, "normal", (), level > 0)
        while self.queue and not self.exhausted:
            node = self.queue.popleft()
            if isinstance(node.value, dict):
                self.expand_object(node)
            else:
                self.expand_array(node)
        return self

    def place(self, value, parent, key, index, depth, level, zone, order, embedded) -> None:
        if depth > self.max_depth:
            return
        if isinstance(value, str):
            if level < self.max_embedded:
                ok, decoded = ref_decode(value, allow_string=False)
                if ok:
                    self.place(decoded, parent, key, index, depth, level + 1, zone, order, True)
                    return
            if zone == "url":
                for n, url in enumerate(ref_urls_in(value)):
                    if not self.tick():
                        return
                    self.urls.append(((*order, n), url))
            return
        if not isinstance(value, dict | list):
            return
        node = RefNode(value, parent, key, index, embedded, depth, level, zone, order)
        self.containers += 1
        if isinstance(value, dict):
            self.objects.append(node)
        self.queue.append(node)

    def expand_object(self, node: RefNode) -> None:
        items = list(islice(node.value.items(), self.max_nodes - self.visited))
        self.exhausted |= len(items) < len(node.value)
        normed = [(ref_norm(key), key, child) for key, child in items]
        rank = {key: n for n, key in enumerate(URL_KEYS)}
        normed.sort(key=lambda item: rank.get(item[0], len(URL_KEYS)))
        for position, (norm, key, child) in enumerate(normed):
            if not self.tick():
                return
            if norm in FIELD_KEYS:
                node.fields.append((norm, key, child))
            if node.zone != "echo":
                self.keys.add(norm)
                if norm:
                    self.raw_keys.add(key)
            zone = node.zone
            if zone == "echo" or norm in ECHO_KEYS:
                zone = "echo"
            elif zone == "url" or norm in rank:
                zone = "url"
            order = (*node.order, position)
            self.place(child, node, key, None, node.depth + 1, node.level, zone, order, False)

    def expand_array(self, node: RefNode) -> None:
        room = self.max_nodes - self.visited
        self.exhausted |= len(node.value) > room
        for index, child in enumerate(islice(node.value, room)):
            if not self.tick():
                return
            order = (*node.order, index)
            self.place(
                child, node, None, index, node.depth + 1, node.level, node.zone, order, False
            )


def ref_path(node: RefNode, leaf: str) -> str:
    def short(key: str) -> str:
        return key if len(key) <= 40 else key[:39] + "…"

    parts = []
    while node is not None:
        part = "." + short(node.key) if node.key is not None else ""
        if node.key is None and node.index is not None:
            part = f"[{node.index}]"
        parts.append(part + ("(json)" if node.embedded else ""))
        node = node.parent
    return ("".join(reversed(parts)) + "." + short(leaf)).lstrip(".")


def ref_clean_id(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    if isinstance(value, float) and abs(value) >= 10**18:
        return None
    if isinstance(value, int) and value.bit_length() > 1000:
        return None
    if isinstance(value, int | float):
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    if not text or len(text) > 200 or not text.isprintable() or " " in text:
        return None
    return None if set(text) & set("\"'`<>\\{}[]") else text


def ref_id(walk: RefWalk, names: tuple[str, ...], max_depth: int) -> tuple[str, str] | None:
    best = None
    found = None
    for node in walk.objects:
        if node.zone != "normal" or node.depth > max_depth:
            continue
        for rank, name in enumerate(names):
            for norm, key, value in node.fields:
                task_id = ref_clean_id(value) if norm == name else None
                if task_id is not None and (best is None or (node.depth, rank) < best):
                    best = (node.depth, rank)
                    found = (task_id, ref_path(node, key))
    return found


# -- comparing the two ----------------------------------------------------------------------


def seen(node) -> tuple:
    """What a walk found about one object, comparable across the two walks."""
    zone = getattr(node.zone, "value", node.zone)
    fields = [(norm, key, repr(value)) for norm, key, value in node.fields]
    return (node.key, node.index, node.embedded, node.depth, node.level, zone, node.order, fields)


def assert_same_walk(value: object, max_depth: int, max_nodes: int, max_embedded: int) -> None:
    ref = RefWalk(max_depth, max_nodes, max_embedded).run(value)
    got = _extract.scan(value, max_depth=max_depth, max_nodes=max_nodes, max_embedded=max_embedded)
    assert [seen(node) for node in got.objects] == [seen(node) for node in ref.objects]
    assert [node.path("x") for node in got.objects] == [ref_path(n, "x") for n in ref.objects]
    ref_urls = tuple(dict.fromkeys(url for _, url in sorted(ref.urls)))
    assert got.urls == ref_urls
    assert (got.keys, got.raw_keys) == (ref.keys, ref.raw_keys)
    assert (got.containers, got.visited, got.exhausted) == (
        ref.containers,
        ref.visited,
        ref.exhausted,
    )
    got_id = None if got.task_id is None else (got.task_id[2], got.task_id[0].path(got.task_id[1]))
    assert got_id == ref_id(ref, ("taskid", "recordid"), max_depth)
    got_generic = got.generic_id
    generic = None if got_generic is None else (got_generic[2], got_generic[0].path(got_generic[1]))
    assert generic == ref_id(ref, ("id",), 2)


# -- values shaped like callbacks ---------------------------------------------------------

KEYS = [
    *["code", "msg", "message", "data", "taskId", "task_id", "TASK-ID", "recordId", "id"],
    *["state", "status", "successFlag", "callbackType", "failCode", "failMsg", "errorCode"],
    *["errorMessage", "taskType", "model", "videoUrl", "resultJson", "resultUrls"],
    *["result_urls", "resultUrl", "originUrls", "imageUrls", "images", "audio_url"],
    *["stream_audio_url", "vocal_removal_info", "resultObject", "instruments", "info"],
    *["response", "param", "paramJson", "promptJson", "generateParam", "input", "text"],
    *["k" * 70, "x", ""],
]
TEXTS = [
    "success",
    "fail",
    "mj_txt2img",
    "complete",
    "text",
    "1",
    " a ",
    "",
    '  {"taskId": "w"}',
    "{oops",
    "[Verse] la la",
    "[1,",
    "https://cdn.test/a.png",
    "http://cdn.test/b.mp4",
    "HTTPS://CDN.TEST/C",
    "ftp://no",
    "https://",
    "[http://cdn.test/1, https://cdn.test/2, http://cdn.test/3]",
    "see https://cdn.test/x",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 600)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(TEXTS)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=6)
        | children.map(json.dumps)  # JSON sent inside a string
    ),
    max_leaves=40,
)
# Result-zone objects holding several URLs beside other keys, so that budgets cut them
# part-way through their URLs.
url_texts = st.sampled_from([text for text in TEXTS if "http" in text])
results = st.dictionaries(
    st.sampled_from(["resultUrls", "videoUrl", "images", "vocal_removal_info", "resultObject"]),
    url_texts
    | st.lists(url_texts, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS), url_texts | scalars, max_size=4),
    min_size=1,
    max_size=3,
)
# Objects naming several ids, some unusable, so that the order between them matters.
ids = st.dictionaries(
    st.sampled_from(["taskId", "task_id", "TASK-ID", "recordId", "id", "x"]),
    st.sampled_from(["a", "b", 7, 7.5, "", "x y", True]),
    min_size=2,
)
values = values | st.dictionaries(
    st.sampled_from(KEYS), values | results | ids | st.lists(ids, max_size=3), max_size=4
).map(lambda value: {**value, "data": value})
limits = st.tuples(st.integers(-1, 8), st.integers(0, 80), st.integers(0, 5))


def sample_values() -> list[object]:
    return [json.loads(path.read_bytes()) for path in SAMPLES]


@MODEST
@given(values, limits)
def test_the_walk_matches_the_reference(value, bounds):
    max_depth, max_nodes, max_embedded = bounds
    assert_same_walk(value, max_depth, max_nodes, max_embedded)
    assert_same_walk(value, _extract.MAX_DEPTH, _extract.MAX_NODES, _extract.MAX_EMBEDDED)


@MODEST
@given(values, st.integers(-1, 6), st.integers(0, 4))
def test_the_walk_matches_the_reference_for_every_budget(value, max_depth, max_embedded):
    needed = RefWalk(max_depth, _extract.MAX_NODES, max_embedded).run(value).visited
    for max_nodes in range(needed + 2):
        assert_same_walk(value, max_depth, max_nodes, max_embedded)


def test_the_walk_of_every_sample_matches_the_reference():
    assert SAMPLES, f"no samples at {FIXTURES / 'callbacks'}"
    for value in sample_values():
        needed = RefWalk(64, 20_000, 4).run(value).visited
        for max_nodes in range(needed + 2):
            assert_same_walk(value, 64, max_nodes, 4)


# -- request echoes read lazily -----------------------------------------------------------


def assert_lazy_echoes_change_nothing(value: object, **bounds: int) -> None:
    full = _extract.scan(value, **bounds)
    lazy = _extract.scan(value, **bounds, lazy_echoes=True)
    assert (lazy.urls, lazy.keys, lazy.raw_keys, lazy.exhausted) == (
        full.urls,
        full.keys,
        full.raw_keys,
        full.exhausted,
    )
    outside = [seen(node) for node in full.objects if node.zone is not _extract.Zone.ECHO]
    assert [seen(node) for node in lazy.objects if node.zone is not _extract.Zone.ECHO] == outside
    assert sorted(map(repr, lazy.echo_fields())) == sorted(map(repr, full.echo_fields()))
    for got, want in ((lazy.task_id, full.task_id), (lazy.generic_id, full.generic_id)):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert (got[0].path(got[1]), got[2]) == (want[0].path(want[1]), want[2])
    assert (lazy.containers == 0) == (full.containers == 0)


def parse_both_ways(body: bytes, **kwargs) -> tuple[dict, dict]:
    lazy = result_to_json(parse_callback(body, **kwargs))
    scan = _extract.scan

    def full_scan(value, **bounds):
        bounds.pop("lazy_echoes", None)
        return scan(value, **bounds)

    with mock.patch.object(callbacks, "scan", full_scan):
        full = result_to_json(parse_callback(body, **kwargs))
    return lazy, full


@MODEST
@given(values, limits)
def test_lazy_echoes_read_the_same(value, bounds):
    max_depth, max_nodes, max_embedded = bounds
    assert_lazy_echoes_change_nothing(value)
    assert_lazy_echoes_change_nothing(
        value, max_depth=max_depth, max_nodes=max_nodes, max_embedded=max_embedded
    )
    body = json.dumps(value).encode()
    lazy, full = parse_both_ways(body)
    assert lazy == full
    limited = ParseLimits(max_depth=max_depth, max_nodes=max_nodes, max_embedded=max_embedded)
    lazy, full = parse_both_ways(body, limits=limited)
    assert lazy == full


@pytest.mark.parametrize("path", SAMPLES, ids=[path.name for path in SAMPLES])
def test_lazy_echoes_read_every_sample_the_same(path):
    body = path.read_bytes()
    value = json.loads(body)
    assert_lazy_echoes_change_nothing(value)
    for max_nodes in range(RefWalk(64, 20_000, 4).run(value).visited + 2):
        assert_lazy_echoes_change_nothing(value, max_nodes=max_nodes)
        lazy, full = parse_both_ways(body, limits=ParseLimits(max_nodes=max_nodes))
        assert lazy == full
    lazy, full = parse_both_ways(body)
    assert lazy == full


def test_echo_json_that_might_overrun_the_budget_is_decoded_after_all():
    echo = json.dumps({"taskType": "mj_txt2img", "n": list(range(40))})
    body = {"data": {"taskId": "a", "promptJson": echo, "pad": list(range(30))}}
    for max_nodes in range(0, 120, 7):
        assert_lazy_echoes_change_nothing(body, max_nodes=max_nodes)
    lazy = _extract.scan(body, max_nodes=60, lazy_echoes=True)
    assert not lazy.deferred  # 60 cannot cover the echo's text: it was walked in full


def test_mj_is_told_from_luma_by_the_lazy_echo():
    mj = {
        "code": 200,
        "data": {
            "taskId": "m",
            "promptJson": json.dumps({"taskType": "mj_txt2img"}),
            "resultUrls": ["https://cdn.test/a.jpeg"],
        },
    }
    luma = {
        "code": 200,
        "data": {
            "taskId": "l",
            "promptJson": json.dumps({"videoUrl": "https://in.test/v.mp4"}),
            "resultUrls": ["https://cdn.test/l.mp4"],
        },
    }
    for value, family in ((mj, "mj"), (luma, "luma")):
        lazy, full = parse_both_ways(json.dumps(value).encode())
        assert lazy == full
        assert lazy["family"] == family


# -- the small pieces ---------------------------------------------------------------------

texts = st.lists(
    st.sampled_from(
        [*'{[]}" \t\n\r\x0bNItfn-01:,aV\\', "\xa0", "NaN", "-Infinity", "true", "\\u00e9"]
    ),
    max_size=12,
).map("".join) | values.map(json.dumps)


@settings(max_examples=500, deadline=None)
@given(texts)
def test_decoding_json_in_text_matches_json(text):
    for allow_string in (False, True):
        got = _extract._decode(text, allow_string=allow_string)
        assert repr(got) == repr(ref_decode(text, allow_string))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(TEXTS) | st.text(max_size=30) | texts)
def test_urls_in_text_match_the_reference(text):
    assert _extract._urls_in(text) == ref_urls_in(text)
    assert _extract._is_url(text) == ref_is_url(text)


def test_the_shape_table_stays_bounded():
    for n in range(3 * _extract._SHAPES_SIZE):
        _extract.scan({f"key{n}": 1, "data": {"taskId": str(n)}})
    assert len(_extract._SHAPES) <= _extract._SHAPES_SIZE
    # Objects with many keys, or long ones, are not kept at all.
    _extract._SHAPES.clear()
    _extract.scan({f"k{n}": n for n in range(_extract._SHAPE_MAX_KEYS + 1)})
    _extract.scan({"k" * 100: 1})
    assert not _extract._SHAPES


def test_integer_reading_is_unchanged_for_huge_and_special_numbers():
    for text in ["1e999", "-1e999", "NaN", "[" + "9" * 1200 + "]", "[" + "9" * 5000 + "]"]:
        assert repr(_extract.loads(text)) == repr(ref_loads(text))
    assert math.isinf(_extract.loads("1e999"))
