"""One bounded walk over a KIE JSON value, shared by the callback parser and the status readers.

:func:`scan` visits a JSON value breadth-first, so shallow keys are always seen before deep
ones. On the way it decodes JSON that arrives inside strings (``resultJson``, a ``data`` sent as
text, a whole body sent as a JSON string), collects result URLs from the keys that hold them,
and notes the few keys that carry a task id, an outcome or an error. Its work is bounded: it
examines at most ``max_nodes`` values, goes no deeper than ``max_depth`` and decodes at most
``max_embedded`` levels of JSON inside strings.

Request echoes (``param``, ``paramJson``, ``promptJson``, ``generateParam``, ``input``) are
walked but kept apart: the input image URLs and parent task ids they hold are neither results
nor the task's own id. Only family guessing ever reads them, so the callback parser has JSON
text inside them decoded only when it does (``lazy_echoes``).

Callbacks repeat a handful of object shapes, so what the walk needs to know about an object's
keys (normalised keys, which hold results, which the readers look at) is worked out once per
sequence of keys and kept in a small bounded table.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from itertools import islice
from json.scanner import make_scanner
from operator import itemgetter
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from kied.core._json import JsonObject, JsonValue

__all__ = [
    "MAX_DEPTH",
    "MAX_EMBEDDED",
    "MAX_NODES",
    "Fields",
    "Node",
    "Outcome",
    "Scan",
    "Zone",
    "as_int",
    "clean_id",
    "error_code_text",
    "flag_text",
    "loads",
    "loads_trimmed",
    "message_text",
    "norm_key",
    "read_fields",
    "scan",
]

MAX_DEPTH: Final = 64
MAX_NODES: Final = 20_000
MAX_EMBEDDED: Final = 4

#: Longest task id kied accepts; anything longer is not an id.
_MAX_ID_CHARS: Final = 200
#: Longest URL kied keeps.
_MAX_URL_CHARS: Final = 8192
#: Error messages and stages are cut to this length, so one body cannot fill a log line or a row.
_MAX_TEXT_CHARS: Final = 2000
#: Keys longer than this cannot be any key kied looks for.
_MAX_KEY_CHARS: Final = 64
#: Integers with more digits than this are read as null (``int()`` refuses beyond 4300).
_MAX_INT_DIGITS: Final = 1000
#: Characters that never appear in a task id: space, quoting, markup, JSON structure.
_NOT_IN_IDS: Final = re.compile(r"[ \"'`<>\\{}\[\]]")


class Outcome(StrEnum):
    """What a callback or a status answer says about a task."""

    SUCCESS = "success"
    FAIL = "fail"
    PENDING = "pending"
    UNKNOWN = "unknown"


class Zone(Enum):
    """Where in a body a value sits."""

    NORMAL = "normal"
    ECHO = "echo"  # inside a request echo: not results, not the task's own id
    URL = "url"  # under a key that holds result URLs


# Looking a member up on an Enum class costs a lookup through its metaclass; the walk runs
# these comparisons for every container.
_NORMAL: Final = Zone.NORMAL
_ECHO: Final = Zone.ECHO
_URL: Final = Zone.URL


def norm_key(key: str) -> str:
    """``taskId``, ``task_id`` and ``Task-ID`` all read as ``taskid``."""
    if len(key) > _MAX_KEY_CHARS:
        return ""
    return key.lower().replace("_", "").replace("-", "")


_ECHO_KEYS: Final = frozenset({"param", "paramjson", "promptjson", "generateparam", "input"})

# Keys whose values are result URLs, best first: within one object the primary result comes
# before thumbnails, stream copies and originals.
_URL_KEYS: Final = (
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
)
_URL_RANK: Final = {key: rank for rank, key in enumerate(_URL_KEYS)}

#: Keys whose values the readers look at.
_FIELDS: Final = frozenset(
    {
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
)

_URL_IN_TEXT: Final = re.compile(r"https?://[^\s\[\]\"'<>,]+", re.IGNORECASE)
#: http:// or https://, in any case, and something after it.
_URL_HEAD: Final = re.compile(r"https?://.", re.IGNORECASE | re.ASCII | re.DOTALL)
#: What can follow the { or [ opening a JSON object or array: ``_decode`` tries no text with
#: anything else there, as a failed decode costs an exception (Suno lyrics open "[Verse]").
_JSON_SECOND: Final = {
    "{": frozenset('"} \t\n\r'),
    "[": frozenset(']"{[-0123456789tfnNI \t\n\r'),
}
_INT_TEXT: Final = re.compile(r"[+-]?\d{1,18}")
_MAX_CODE: Final = 10**18
_MAX_INT_BITS: Final = 1000


# -- values -------------------------------------------------------------------------------


def _parse_int(text: str) -> int | None:
    return int(text) if len(text) <= _MAX_INT_DIGITS else None


def _parse_constant(_text: str) -> None:
    # NaN and Infinity are not JSON; read them as null rather than as floats nobody can store.
    return None


_JSON_SPACE: Final = " \t\n\r"
_DECODER: Final = json.JSONDecoder(parse_constant=_parse_constant)
#: What ``_DECODER.raw_decode`` calls, called directly: one JSON value from an offset.
_SCAN: Final = make_scanner(_DECODER)  # type: ignore[arg-type]  # typeshed wants a Scanner
# Slower (a Python call per integer), so only for bodies the fast decoder refused.
_CAREFUL_DECODER: Final = json.JSONDecoder(parse_int=_parse_int, parse_constant=_parse_constant)


def loads(text: str) -> JsonValue:
    """``json.loads`` that reads NaN/Infinity and integers too long to convert as null.

    Raises:
        ValueError: not JSON.
        RecursionError: nested deeper than the interpreter allows.
    """
    return loads_trimmed(text.strip(_JSON_SPACE))


def loads_trimmed(text: str) -> JsonValue:
    """:func:`loads` for text with no JSON whitespace around it."""
    try:
        value: JsonValue
        value, end = _SCAN(text, 0)
    except StopIteration:
        raise json.JSONDecodeError("Expecting value", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        # An integer past the interpreter's digit limit; read such integers as null.
        value = _CAREFUL_DECODER.decode(text)
    else:
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


def _safe_text(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def as_int(value: JsonValue) -> int | None:
    """An integer from an int, an integral float or a short numeric string; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if abs(value) < _MAX_CODE else None
    if isinstance(value, float):
        finite = math.isfinite(value) and value.is_integer() and abs(value) < _MAX_CODE
        return int(value) if finite else None
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def message_text(value: JsonValue) -> str | None:
    """Readable text from a string or a number, stripped and bounded; None when empty."""
    if isinstance(value, str):
        # Lone surrogates (from "\ud800" escapes) cannot be encoded; replace them.
        text = (value if value.isascii() else _safe_text(value)).strip()
        if "\x00" in text:
            # No database keeps NUL in text; it carries nothing a reader needs.
            text = text.replace("\x00", "").strip()
    elif isinstance(value, bool) or value is None or isinstance(value, list | dict):
        return None
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        text = str(int(value)) if value.is_integer() else str(value)
    elif value.bit_length() > _MAX_INT_BITS:
        return None
    else:
        text = str(value)
    if not text:
        return None
    if len(text) > _MAX_TEXT_CHARS:
        return text[: _MAX_TEXT_CHARS - 1] + "…"
    return text


_NO_ERROR: Final = ("0", "200")


def error_code_text(value: JsonValue) -> str | None:
    """An error code as text; the "no error" values (null, "", 0, 200) are None."""
    text = message_text(value)
    if text is None or text in _NO_ERROR:
        return None
    return text


def flag_text(value: JsonValue) -> str | None:
    """A state, status or flag value as text (``1``, ``"1"`` and ``1.0`` all read ``"1"``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return message_text(value)


def _integral(value: int | float) -> bool:
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer() and abs(value) < _MAX_CODE
    # More bits than a 200-digit id could need (and str() refuses past 4300 digits).
    return value.bit_length() <= _MAX_INT_BITS


def clean_id(value: JsonValue) -> str | None:
    """A task id from a string or an integer; None for anything empty or absurd."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, bool) or not isinstance(value, int | float) or not _integral(value):
        return None
    else:
        text = str(int(value))
    if not text or len(text) > _MAX_ID_CHARS:
        return None
    if not text.isprintable() or _NOT_IN_IDS.search(text):
        return None
    return text


def _is_url(text: str) -> bool:
    return (
        len(text) <= _MAX_URL_CHARS
        and _URL_HEAD.match(text) is not None
        and text.isprintable()
        and " " not in text
    )


def _urls_in(text: str) -> list[str]:
    text = text.strip()
    # _is_url, without a call: most texts here are one URL.
    if (
        len(text) <= _MAX_URL_CHARS
        and _URL_HEAD.match(text) is not None
        and text.isprintable()
        and " " not in text
    ):
        return [text]
    # Some doc versions send a list as text that is not JSON: '[http://a.mp4, http://b.mp4]'.
    if not text.startswith("["):
        return []
    return [url for url in _URL_IN_TEXT.findall(text) if _is_url(url)]


# -- the walk -----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Node:
    """One object or array met on the walk."""

    value: JsonObject | list[JsonValue]
    parent: Node | None
    key: str | None  # the key it sits under in its parent object
    level: int  # how many JSON-in-a-string decodes led here
    zone: Zone
    #: Its place in a depth-first reading with result keys first: result URLs are sorted by it.
    #: One position per level down, so its length is the depth.
    order: tuple[int, ...]
    #: Once an object is walked: its shape, its values in walk order, and how many of them the
    #: budget covered.
    walked: tuple[_Shape, Sequence[JsonValue], int] | None = field(default=None, init=False)

    @property
    def depth(self) -> int:
        return len(self.order)

    @property
    def index(self) -> int | None:
        """Its index in its parent array."""
        return self.order[-1] if self.key is None and self.parent is not None else None

    @property
    def embedded(self) -> bool:
        """Whether it was decoded from a JSON string."""
        return self.level > (0 if self.parent is None else self.parent.level)

    @property
    def fields(self) -> list[tuple[str, str, JsonValue]]:
        """The keys readers look at, in walk order: (normalised key, key as sent, value)."""
        if self.walked is None:
            return []
        shape, values, walked = self.walked
        return [(norm, key, values[at]) for at, norm, key in shape.fields if at < walked]

    def get(self, name: str) -> Iterator[tuple[str, JsonValue]]:
        """Every (key as sent, value) whose normalised key is ``name``."""
        return ((key, value) for norm, key, value in self.fields if norm == name)

    def path(self, leaf: str) -> str:
        """Where ``leaf`` sits, e.g. ``data.taskId``, ``data[0].taskId``, ``data(json).taskId``."""
        text = "." + (leaf if len(leaf) <= _SHORT else _short(leaf))
        node = self
        while (parent := node.parent) is not None:
            if node.level > parent.level:
                text = "(json)" + text
            if (key := node.key) is not None:
                text = "." + (key if len(key) <= _SHORT else _short(key)) + text
            else:
                text = f"[{node.order[-1]}]{text}"
            node = parent
        if node.level:
            text = "(json)" + text
        return text.lstrip(".")

    def chain(self) -> list[Node]:
        """This object and the objects that contain it, nearest first."""
        chain: list[Node] = []
        node: Node | None = self
        while node is not None:
            if isinstance(node.value, dict):
                chain.append(node)
            node = node.parent
        return chain


_SHORT: Final = 40  # keys shown in a path are cut to this length


def _short(key: str) -> str:
    return key if len(key) <= _SHORT else key[: _SHORT - 1] + "…"


@dataclass(slots=True, eq=False)
class Scan:
    """What one walk found."""

    #: Every object, in the order visited: shallow first, so their depths never decrease.
    objects: list[Node]
    urls: tuple[str, ...]  # result URLs, best first, without duplicates
    keys: frozenset[str]  # normalised keys seen outside request echoes
    raw_keys: frozenset[str]  # the same keys as sent
    containers: int  # objects and arrays met
    visited: int  # values examined: the work done
    exhausted: bool  # the node budget ran out before the walk ended
    #: The shallowest usable ``taskId`` (or, at its depth, ``recordId``) outside request echoes
    #: and results, with the object holding it and its key as sent.
    task_id: tuple[Node, str, str] | None
    generic_id: tuple[Node, str, str] | None  # the same for a generic ``id``
    #: JSON text in request echoes left undecoded (see :func:`scan`), with the room left
    #: under ``max_depth`` and ``max_embedded`` where it sits.
    deferred: list[tuple[str, int, int]]

    def echo_fields(self) -> list[tuple[str, JsonValue]]:
        """(normalised key, value) of every field read inside request echoes, in no order."""
        fields = [
            (norm, value)
            for node in self.objects
            if node.zone is _ECHO
            for norm, _, value in node.fields
        ]
        if self.deferred:
            fields.extend(_fields_in_text(self.deferred))
        return fields


#: One key of an object as the walk reads it: (normalised key, key as sent, whether readers
#: look at it, the zone it opens or None when its value stays in its object's zone).
_KeyInfo: TypeAlias = tuple[str, str, bool, Zone | None]

_UNRANKED: Final = len(_URL_KEYS)

#: The keys that name the task, by rank: a ``taskId`` beats a ``recordId`` at the same depth,
#: and a generic ``id`` counts only when no other id does, and only this shallow (``id``,
#: ``data.id``, ``data[0].id``: Suno's track ids sit deeper).
_ID_RANKS: Final = {"taskid": 0, "recordid": 1, "id": 2}
_GENERIC_ID: Final = 2
_GENERIC_ID_MAX_DEPTH: Final = 2


@dataclass(frozen=True, slots=True, eq=False)
class _Shape:
    """How the walk reads an object with a given sequence of keys."""

    #: Puts the values in walk order (result keys first, best first, then the rest in
    #: document order); None when that is document order.
    reorder: Callable[[list[JsonValue]], tuple[JsonValue, ...]] | None
    keys: tuple[_KeyInfo, ...]  # in walk order
    #: Per key in walk order, whether its value is in the result zone when the object is
    #: outside it, and when the object is inside it.
    results_below_other: tuple[bool, ...]
    results_below_results: tuple[bool, ...]
    norms: frozenset[str]  # every normalised key
    raw_keys: frozenset[str]  # the keys as sent whose normalised key is not empty
    ids: tuple[tuple[int, int], ...]  # (walk position, rank) of the keys that name a task
    #: The keys readers look at: (walk position, normalised key, key as sent).
    fields: tuple[tuple[int, str, str], ...]
    #: (walk position, field of :class:`Fields`) of the keys :func:`read_fields` reads.
    slots: tuple[tuple[int, int], ...]
    opens_results: bool  # some key holds result URLs


def _make_shape(keys: tuple[str, ...]) -> _Shape:
    ranked: list[tuple[int, int, _KeyInfo]] = []
    for index, key in enumerate(keys):
        norm = norm_key(key)
        rank = _URL_RANK.get(norm, _UNRANKED)
        opens = _ECHO if norm in _ECHO_KEYS else _URL if rank < _UNRANKED else None
        ranked.append((rank, index, (norm, key, norm in _FIELDS, opens)))
    ranked.sort()  # by rank, then document order: no two entries tie
    order = tuple(index for _, index, _ in ranked)
    infos = tuple(info for _, _, info in ranked)
    return _Shape(
        # A permutation of two or more keys, so the getter returns a tuple.
        reorder=None if order == tuple(range(len(keys))) else itemgetter(*order),
        keys=infos,
        results_below_other=tuple(opens is _URL for _, _, _, opens in infos),
        results_below_results=tuple(opens is not _ECHO for _, _, _, opens in infos),
        norms=frozenset(norm for norm, _, _, _ in infos),
        raw_keys=frozenset(key for norm, key, _, _ in infos if norm),
        ids=tuple(
            (position, _ID_RANKS[info[0]])
            for position, info in enumerate(infos)
            if info[0] in _ID_RANKS
        ),
        fields=tuple(
            (position, norm, key) for position, (norm, key, field, _) in enumerate(infos) if field
        ),
        slots=tuple(
            (position, _SLOTS[info[0]]) for position, info in enumerate(infos) if info[0] in _SLOTS
        ),
        opens_results=any(rank < _UNRANKED for rank, _, _ in ranked),
    )


#: Shapes of small objects with short keys, by key sequence: a callback's objects repeat
#: from one body to the next. Emptied when full, so it stays bounded whatever arrives.
_SHAPES: Final[dict[tuple[str, ...], _Shape]] = {}
_SHAPES_SIZE: Final = 1024
_SHAPE_MAX_KEYS: Final = 64


def _shape(keys: tuple[str, ...]) -> _Shape:
    shape = _SHAPES.get(keys)
    if shape is None:
        shape = _make_shape(keys)
        if len(keys) <= _SHAPE_MAX_KEYS and all(len(key) <= _MAX_KEY_CHARS for key in keys):
            if len(_SHAPES) >= _SHAPES_SIZE:
                _SHAPES.clear()
            _SHAPES[keys] = shape
    return shape


_CONTAINERS: Final = (dict, list)
_KEY_OF: Final = itemgetter(0)
_VALUE_OF: Final = itemgetter(1)
_OPENERS: Final = frozenset("{[")


def _decode(text: str, *, allow_string: bool) -> tuple[bool, JsonValue]:
    """Decode JSON held in a string; (False, None) when it is not JSON worth reading."""
    text = text.strip()
    if not text or text[0] not in ('{["' if allow_string else "{["):
        return False, None
    if text[0] != '"' and text[1:2] not in _JSON_SECOND[text[0]]:
        return False, None
    try:
        return True, loads_trimmed(text)
    except (ValueError, RecursionError):
        return False, None


def scan(
    root: JsonValue,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    max_embedded: int = MAX_EMBEDDED,
    lazy_echoes: bool = False,
) -> Scan:
    """Walk ``root`` breadth-first within the given bounds; see the module docstring.

    Every value examined costs one unit of ``max_nodes``, and so does every URL harvested;
    an object or array is cut at the first value the budget does not cover, and the walk
    stops at the first container it cannot finish.

    With ``lazy_echoes``, JSON text inside request echoes is decoded only when
    :meth:`Scan.echo_fields` asks for it: the echo's objects are then missing from
    ``objects`` and its values from ``visited``, and nothing else changes. That holds only
    while the budget would have covered the text, so when it might not have, the walk is
    made again in full.
    """
    queue: deque[Node] = deque()
    objects: list[Node] = []
    urls: list[tuple[tuple[int, ...], str]] = []
    keys: set[str] = set()
    raw_keys: set[str] = set()
    deferred: list[tuple[str, int, int]] = []
    deferred_cost = 0
    # The ids found so far, as (depth, rank, node, key, id): objects are met shallow first.
    task_id: tuple[int, int, Node, str, str] | None = None
    generic_id: tuple[Node, str, str] | None = None
    visited = 0
    exhausted = max_nodes <= 0
    if not exhausted:
        visited = 1
        value, level = root, 0
        # A whole body may arrive as a JSON string, even one holding another JSON string.
        while isinstance(value, str) and level < max_embedded:
            ok, decoded = _decode(value, allow_string=True)
            if not ok:
                break
            value, level = decoded, level + 1
        if isinstance(value, _CONTAINERS) and max_depth >= 0:
            node = Node(value, None, None, level, _NORMAL, ())
            if isinstance(value, dict):
                objects.append(node)
            queue.append(node)

    expanded = 0
    child_zone: Zone
    key: str | None
    while queue and not exhausted:
        node = queue.popleft()
        expanded += 1
        value = node.value
        zone = node.zone
        in_echo = zone is _ECHO
        remaining = max_nodes - visited
        values: Sequence[JsonValue]
        shape: _Shape | None = None
        if isinstance(value, dict):
            if type(value) is dict and len(value) <= remaining:
                names = tuple(value)
                values = list(value.values())
            else:
                # A dict subclass is read through len() and items() alone: it may override them.
                exhausted = len(value) > remaining
                pairs = list(islice(value.items(), remaining))
                names = tuple(map(_KEY_OF, pairs))
                values = list(map(_VALUE_OF, pairs))
            shape = _SHAPES.get(names) or _shape(names)
            if shape.reorder is not None:
                values = shape.reorder(values)
            harvests = zone is _URL or (shape.opens_results and not in_echo)
            in_results = shape.results_below_results if zone is _URL else shape.results_below_other
        else:
            exhausted = len(value) > remaining
            values = list(islice(value, remaining)) if exhausted else value
            harvests = zone is _URL

        walked = len(values)  # how many of them the budget covers
        base = node.order
        depth = len(base) + 1
        if depth > max_depth or not harvests:
            # Only harvesting URLs can spend the budget part-way through the values.
            visited += walked
        if depth <= max_depth:
            level = node.level
            decodes = level < max_embedded
            for position, child in enumerate(values):
                if harvests:
                    if visited >= max_nodes:
                        exhausted = True
                        walked = position
                        break
                    visited += 1
                container: JsonObject | list[JsonValue]
                if isinstance(child, str):
                    if decodes and ((head := child[:1]) in _OPENERS or head.isspace()):
                        if lazy_echoes and (
                            in_echo or (shape is not None and shape.keys[position][3] is _ECHO)
                        ):
                            # Each value its text holds starts at a character of its own, and
                            # each level of JSON-in-a-string decoded below is shorter still.
                            deferred.append((child, max_depth - depth, max_embedded - level))
                            deferred_cost += len(child) * (max_embedded - level)
                            continue
                        ok, decoded = _decode(child, allow_string=False)
                        if ok:
                            # A JSON text that opens with { or [ is an object or an array.
                            if not isinstance(decoded, _CONTAINERS):
                                continue
                            container, embedded = decoded, True
                    else:
                        ok = False
                    if not ok:
                        if not harvests or (shape is not None and not in_results[position]):
                            continue
                        for index, url in enumerate(_urls_in(child)):
                            if visited >= max_nodes:
                                exhausted = True
                                break
                            visited += 1
                            urls.append(((*base, position, index), url))
                        continue
                elif isinstance(child, _CONTAINERS):
                    container, embedded = child, False
                else:
                    continue
                if shape is None:
                    key, child_zone = None, zone
                else:
                    _, key, _, opens = shape.keys[position]
                    child_zone = zone if opens is None or in_echo else opens
                placed = Node(
                    container,
                    node,
                    key,
                    level + 1 if embedded else level,
                    child_zone,
                    (*base, position),
                )
                if isinstance(container, dict):
                    objects.append(placed)
                queue.append(placed)

        if shape is None:
            continue
        if shape.ids and zone is _NORMAL:
            node_depth = depth - 1
            for at, rank in shape.ids:
                if at >= walked:
                    break
                if rank == _GENERIC_ID:
                    if generic_id is not None or node_depth > _GENERIC_ID_MAX_DEPTH:
                        continue
                elif task_id is not None and (node_depth, rank) >= task_id[:2]:
                    continue
                if (found := clean_id(values[at])) is None:
                    continue
                key = shape.keys[at][1]
                if rank == _GENERIC_ID:
                    generic_id = (node, key, found)
                else:
                    task_id = (node_depth, rank, node, key, found)
        node.walked = (shape, values, walked)
        # The keys seen outside request echoes, of those the budget covered.
        if in_echo:
            continue
        if walked == len(values):
            keys |= shape.norms
            raw_keys |= shape.raw_keys
            continue
        for norm, key, _, _ in shape.keys[:walked]:
            keys.add(norm)
            if norm:
                raw_keys.add(key)

    if deferred and (exhausted or visited + deferred_cost > max_nodes):
        # The text set aside might have run the budget out: walk again, decoding it.
        return scan(root, max_depth=max_depth, max_nodes=max_nodes, max_embedded=max_embedded)
    # Breadth-first finds shallow things first; results read best in document order.
    if len(urls) > 1:
        urls.sort()
    return Scan(
        objects,
        tuple(dict.fromkeys(map(_VALUE_OF, urls)))
        if len(urls) > 1
        else (urls[0][1],)
        if urls
        else (),
        frozenset(keys),
        frozenset(raw_keys),
        expanded + len(queue),  # every container met was queued
        visited,
        exhausted,
        None if task_id is None else task_id[2:],
        generic_id,
        deferred,
    )


def _fields_in_text(deferred: list[tuple[str, int, int]]) -> list[tuple[str, JsonValue]]:
    """The fields the walk would have read in the objects of deferred JSON text.

    Each entry is (text, depth room, decode room): how many levels the walk may still go
    down, and how many more JSON-in-a-string decodes it may make, where the text sits.
    """
    fields: list[tuple[str, JsonValue]] = []
    stack: list[tuple[JsonObject | list[JsonValue], int, int]] = []
    for text, depth_room, decode_room in deferred:
        ok, decoded = _decode(text, allow_string=False)
        if ok and isinstance(decoded, _CONTAINERS):
            stack.append((decoded, depth_room, decode_room - 1))
    while stack:
        value, depth_room, decode_room = stack.pop()
        children: Iterable[JsonValue]
        if isinstance(value, dict):
            children = value.values()
            names = tuple(value)
            for _, norm, key in (_SHAPES.get(names) or _shape(names)).fields:
                fields.append((norm, value[key]))
        else:
            children = value
        if depth_room < 1:
            continue
        for child in children:
            if isinstance(child, str):
                if decode_room > 0 and ((head := child[:1]) in _OPENERS or head.isspace()):
                    ok, decoded = _decode(child, allow_string=False)
                    if ok and isinstance(decoded, _CONTAINERS):
                        stack.append((decoded, depth_room - 1, decode_room - 1))
            elif isinstance(child, _CONTAINERS):
                stack.append((child, depth_room - 1, decode_room))
    return fields


# -- reading fields -----------------------------------------------------------------------

# Which field of :class:`Fields` each key read by :func:`read_fields` fills.
_CODE, _MESSAGE, _STAGE, _ERROR_CODE, _ERROR_MESSAGE, _STATE, _STATUS, _SUCCESS_FLAG = range(8)
_SLOTS: Final = {
    "code": _CODE,
    "msg": _MESSAGE,
    "message": _MESSAGE,
    "callbacktype": _STAGE,
    "failcode": _ERROR_CODE,
    "errorcode": _ERROR_CODE,
    "failmsg": _ERROR_MESSAGE,
    "failmessage": _ERROR_MESSAGE,
    "errormessage": _ERROR_MESSAGE,
    "errormsg": _ERROR_MESSAGE,
    "state": _STATE,
    "status": _STATUS,
    "successflag": _SUCCESS_FLAG,
}


@dataclass(slots=True, eq=False)
class Fields:
    """What a body's fields say, each the first usable value in the objects read.

    The state-like ones (``state``, ``status``, ``successFlag``) are read with the per-family
    maps, which also look at ``has_error`` and ``has_urls``.
    """

    code: int | None  # the envelope ``code``
    message: str | None  # ``msg`` or ``message``
    stage: str | None  # Suno's ``callbackType``
    error_code: str | None  # ``failCode`` or ``errorCode``
    error_message: str | None  # ``failMsg``, ``errorMessage``, …
    state: str | None  # Market / Runway ``state``
    status: str | None  # Suno-style and 4o ``status``
    success_flag: str | None  # ``successFlag``
    has_urls: bool  # result URLs were found

    @property
    def has_error(self) -> bool:
        """A non-empty error message or a real error code."""
        return self.error_code is not None or self.error_message is not None


def read_fields(nodes: Iterable[Node], *, has_urls: bool) -> Fields:
    """Read every field of :class:`Fields` in one pass over the objects of ``nodes``.

    Objects inside request echoes and results are passed over. Each field takes the first
    value its reader accepts, in node order and, within a node, in document order; a value
    the reader refuses (an empty message, a code of 0) is passed over for the next one.
    """
    code: int | None = None
    texts: list[str | None] = [None] * 8
    for node in nodes:
        if node.walked is None or node.zone is not _NORMAL:
            continue
        shape, values, walked = node.walked
        for at, slot in shape.slots:
            if at >= walked:
                break
            value = values[at]
            if value is None:  # every reader reads null as nothing
                continue
            if slot == _CODE:
                if code is None:
                    code = as_int(value)
            elif texts[slot] is None:
                # flag_text and error_code_text, without a call each.
                if slot >= _STATE and isinstance(value, bool):
                    texts[slot] = "true" if value else "false"
                else:
                    text = message_text(value)
                    texts[slot] = None if slot == _ERROR_CODE and text in _NO_ERROR else text
    return Fields(
        code,
        texts[_MESSAGE],
        texts[_STAGE],
        texts[_ERROR_CODE],
        texts[_ERROR_MESSAGE],
        texts[_STATE],
        texts[_STATUS],
        texts[_SUCCESS_FLAG],
        has_urls,
    )
