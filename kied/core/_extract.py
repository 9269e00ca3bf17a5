"""One bounded walk over a KIE JSON value, shared by the callback parser and the status readers.

:func:`scan` visits a JSON value breadth-first, so shallow keys are always seen before deep
ones. On the way it decodes JSON that arrives inside strings (``resultJson``, a ``data`` sent as
text, a whole body sent as a JSON string), collects result URLs from the keys that hold them,
and notes the few keys that carry a task id, an outcome or an error. Its work is bounded: it
examines at most ``max_nodes`` values, goes no deeper than ``max_depth`` and decodes at most
``max_embedded`` levels of JSON inside strings.

Request echoes (``param``, ``paramJson``, ``promptJson``, ``generateParam``, ``input``) are
walked but kept apart: the input image URLs and parent task ids they hold are neither results
nor the task's own id.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Final, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from kied.core._json import JsonObject, JsonValue

__all__ = [
    "MAX_DEPTH",
    "MAX_EMBEDDED",
    "MAX_NODES",
    "Fields",
    "Flags",
    "Node",
    "Outcome",
    "Scan",
    "Zone",
    "as_int",
    "clean_id",
    "error_code_text",
    "flag_text",
    "loads",
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
#: Characters that never appear in a task id: quoting, markup, JSON structure.
_ID_FORBIDDEN: Final = frozenset("\"'`<>\\{}[]")


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
_INT_TEXT: Final = re.compile(r"[+-]?\d{1,18}")
_MAX_CODE: Final = 10**18
_MAX_INT_BITS: Final = 1000


# -- values -------------------------------------------------------------------------------


def _parse_int(text: str) -> int | None:
    return int(text) if len(text) <= _MAX_INT_DIGITS else None


def _parse_constant(_text: str) -> None:
    # NaN and Infinity are not JSON; read them as null rather than as floats nobody can store.
    return None


_DECODER: Final = json.JSONDecoder(parse_constant=_parse_constant)
# Slower (a Python call per integer), so only for bodies the fast decoder refused.
_CAREFUL_DECODER: Final = json.JSONDecoder(parse_int=_parse_int, parse_constant=_parse_constant)


def loads(text: str) -> JsonValue:
    """``json.loads`` that reads NaN/Infinity and integers too long to convert as null.

    Raises:
        ValueError: not JSON.
        RecursionError: nested deeper than the interpreter allows.
    """
    try:
        value: JsonValue = _DECODER.decode(text)
    except json.JSONDecodeError:
        raise
    except ValueError:
        # An integer past the interpreter's digit limit; read such integers as null.
        value = _CAREFUL_DECODER.decode(text)
    return value


def _safe_text(text: str) -> str:
    # Lone surrogates (from "\ud800" escapes) cannot be encoded; replace them.
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
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        return None
    if isinstance(value, str):
        text = _safe_text(value).strip()
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


def error_code_text(value: JsonValue) -> str | None:
    """An error code as text; the "no error" values (null, "", 0, 200) are None."""
    text = message_text(value)
    if text is None or text in ("0", "200"):
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
    if isinstance(value, bool) or (isinstance(value, int | float) and not _integral(value)):
        return None
    if isinstance(value, int | float):
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    if not text or len(text) > _MAX_ID_CHARS:
        return None
    if not text.isprintable() or " " in text or not _ID_FORBIDDEN.isdisjoint(text):
        return None
    return text


def _is_url(text: str) -> bool:
    if len(text) > _MAX_URL_CHARS:
        return False
    head = text[:8].lower()
    rest = text[8:] if head == "https://" else text[7:] if head.startswith("http://") else ""
    return bool(rest) and text.isprintable() and " " not in text


def _urls_in(text: str) -> Iterator[str]:
    text = text.strip()
    if _is_url(text):
        yield text
        return
    # Some doc versions send a list as text that is not JSON: '[http://a.mp4, http://b.mp4]'.
    if not text.startswith("["):
        return
    for match in _URL_IN_TEXT.finditer(text):
        if _is_url(match.group()):
            yield match.group()


# -- the walk -----------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Node:
    """One object or array met on the walk."""

    value: JsonObject | list[JsonValue]
    parent: Node | None
    key: str | None  # the key it sits under in its parent object
    index: int | None  # its index in its parent array
    embedded: bool  # decoded from a JSON string
    depth: int
    level: int  # how many JSON-in-a-string decodes led here
    zone: Zone
    #: Its place in a depth-first reading with result keys first: result URLs are sorted by it.
    order: tuple[int, ...]
    #: The keys readers look at, in document order: (normalised key, key as sent, value).
    fields: list[tuple[str, str, JsonValue]] = field(default_factory=list)

    def get(self, name: str) -> Iterator[tuple[str, JsonValue]]:
        """Every (key as sent, value) whose normalised key is ``name``."""
        return ((key, value) for norm, key, value in self.fields if norm == name)

    def path(self, leaf: str) -> str:
        """Where ``leaf`` sits, e.g. ``data.taskId``, ``data[0].taskId``, ``data(json).taskId``."""
        parts: list[str] = []
        node: Node | None = self
        while node is not None:
            part = ""
            if node.key is not None:
                part = "." + _short(node.key)
            elif node.index is not None:
                part = f"[{node.index}]"
            if node.embedded:
                part += "(json)"
            parts.append(part)
            node = node.parent
        return ("".join(reversed(parts)) + "." + _short(leaf)).lstrip(".")

    def chain(self) -> list[Node]:
        """This object and the objects that contain it, nearest first."""
        chain: list[Node] = []
        node: Node | None = self
        while node is not None:
            if isinstance(node.value, dict):
                chain.append(node)
            node = node.parent
        return chain


def _short(key: str) -> str:
    return key if len(key) <= 40 else key[:39] + "…"


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


#: One key of an object as the walk reads it: (normalised key, key as sent, whether readers
#: look at it, the zone it opens or None when its value stays in its object's zone).
_KeyInfo: TypeAlias = tuple[str, str, bool, Zone | None]

_UNRANKED: Final = len(_URL_KEYS)


@dataclass(frozen=True, slots=True, eq=False)
class _Shape:
    """How the walk reads an object with a given sequence of keys."""

    #: The document index of each key in walk order (result keys first, best first, then the
    #: rest in document order); None when that is document order.
    order: tuple[int, ...] | None
    keys: tuple[_KeyInfo, ...]  # in walk order
    norms: frozenset[str]  # every normalised key
    raw_keys: frozenset[str]  # the keys as sent whose normalised key is not empty
    fields: tuple[tuple[int, str, str], ...]  # (walk position, norm, key) of keys readers read
    opens_results: bool  # some key holds result URLs


def _make_shape(keys: tuple[str, ...]) -> _Shape:
    ranked: list[tuple[int, int, _KeyInfo]] = []
    for index, key in enumerate(keys):
        norm = norm_key(key)
        rank = _URL_RANK.get(norm, _UNRANKED)
        opens = Zone.ECHO if norm in _ECHO_KEYS else Zone.URL if rank < _UNRANKED else None
        ranked.append((rank, index, (norm, key, norm in _FIELDS, opens)))
    ranked.sort()  # by rank, then document order: no two entries tie
    order = tuple(index for _, index, _ in ranked)
    infos = tuple(info for _, _, info in ranked)
    return _Shape(
        order=None if order == tuple(range(len(keys))) else order,
        keys=infos,
        norms=frozenset(norm for norm, _, _, _ in infos),
        raw_keys=frozenset(key for norm, key, _, _ in infos if norm),
        fields=tuple(
            (position, norm, key) for position, (norm, key, field, _) in enumerate(infos) if field
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


class _Walker:
    """The state of one walk.

    Each value examined costs one unit of ``max_nodes``, as does each URL harvested. A
    container walked whole with no URL to harvest cannot run out part-way, so it is charged
    in one go (``bulk``) and its values placed in one tight loop; the others are walked one
    value at a time. Both ways give the same walk; ``bulk=False`` forces the second.
    """

    def __init__(self, max_depth: int, max_nodes: int, max_embedded: int, bulk: bool) -> None:
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.max_embedded = max_embedded
        self.bulk = bulk
        self.queue: deque[Node] = deque()
        self.objects: list[Node] = []
        self.urls: list[tuple[tuple[int, ...], str]] = []
        self.keys: set[str] = set()
        self.raw_keys: set[str] = set()
        self.visited = 0
        self.exhausted = False

    def tick(self) -> bool:
        if self.visited >= self.max_nodes:
            self.exhausted = True
            return False
        self.visited += 1
        return True

    def run(self, root: JsonValue) -> Scan:
        if self.tick():
            value, level = root, 0
            # A whole body may arrive as a JSON string, even one holding another JSON string.
            while isinstance(value, str) and level < self.max_embedded:
                ok, decoded = _decode(value, allow_string=True)
                if not ok:
                    break
                value, level = decoded, level + 1
            self.place(value, None, None, None, 0, level, Zone.NORMAL, (), level > 0)
        expanded = self.expand_all()
        urls = self.urls
        return Scan(
            self.objects,
            # Breadth-first finds shallow things first; results read best in document order.
            tuple(dict.fromkeys(url for _, url in sorted(urls)))
            if len(urls) > 1
            else tuple(url for _, url in urls),
            frozenset(self.keys),
            frozenset(self.raw_keys),
            expanded + len(self.queue),  # every container met was queued
            self.visited,
            self.exhausted,
        )

    def expand_all(self) -> int:
        """Expand queued containers until none is left or the budget is spent; how many."""
        queue, objects, keys, raw_keys = self.queue, self.objects, self.keys, self.raw_keys
        max_nodes, max_depth, max_embedded = self.max_nodes, self.max_depth, self.max_embedded
        shapes, bulk = _SHAPES, self.bulk
        expanded = 0
        while queue and not self.exhausted:
            node = queue.popleft()
            expanded += 1
            value = node.value
            zone = node.zone
            infos: tuple[_KeyInfo, ...] | None = None
            if isinstance(value, dict):
                remaining = max_nodes - self.visited
                if len(value) > remaining:
                    self.exhausted = True
                    pairs = list(islice(value.items(), remaining))
                else:
                    pairs = list(value.items())
                names = tuple(map(_KEY_OF, pairs))
                shape = shapes.get(names) or _shape(names)
                values: list[JsonValue] = list(map(_VALUE_OF, pairs))
                if shape.order is not None:
                    values = [values[index] for index in shape.order]
                if (
                    not bulk
                    or self.exhausted
                    or zone is Zone.URL
                    or (shape.opens_results and zone is not Zone.ECHO)
                ):
                    self.walk_object(node, shape, values)
                    continue
                self.visited += len(values)
                if zone is not Zone.ECHO:
                    keys |= shape.norms
                    raw_keys |= shape.raw_keys
                if shape.fields:
                    node.fields.extend(
                        (norm, key, values[position]) for position, norm, key in shape.fields
                    )
                infos = shape.keys
            else:
                values = value
                if not bulk or len(values) > max_nodes - self.visited or zone is Zone.URL:
                    self.walk_array(node, values)
                    continue
                self.visited += len(values)

            # Place the values: no value here is in the result zone, so there is nothing to
            # harvest, and decoding JSON held in a string yields an object or an array.
            depth = node.depth + 1
            if depth > max_depth:
                continue
            in_echo = zone is Zone.ECHO
            level = node.level
            decodes = level < max_embedded
            base = node.order
            for position, child in enumerate(values):
                if isinstance(child, str):
                    if not decodes or not ((head := child[:1]) in _OPENERS or head.isspace()):
                        continue
                    ok, child = _decode(child, allow_string=False)
                    if not ok or not isinstance(child, _CONTAINERS):
                        continue
                    embedded, child_level = True, level + 1
                elif isinstance(child, _CONTAINERS):
                    embedded, child_level = False, level
                else:
                    continue
                if infos is None:
                    key, index, child_zone = None, position, zone
                else:
                    _, key, _, opens = infos[position]
                    index, child_zone = None, zone if opens is None or in_echo else opens
                placed = Node(
                    child, node, key, index, embedded, depth, child_level, child_zone, base
                )
                placed.order = (*base, position)
                if isinstance(child, dict):
                    objects.append(placed)
                queue.append(placed)
        return expanded

    def place(
        self,
        value: JsonValue,
        parent: Node | None,
        key: str | None,
        index: int | None,
        depth: int,
        level: int,
        zone: Zone,
        order: tuple[int, ...],
        embedded: bool,
    ) -> None:
        """Queue ``value`` if it is an object or array; decode JSON and harvest URLs in text."""
        if depth > self.max_depth:
            return
        if isinstance(value, str):
            if level < self.max_embedded:
                ok, decoded = _decode(value, allow_string=False)
                if ok:
                    self.place(decoded, parent, key, index, depth, level + 1, zone, order, True)
                    return
            if zone is Zone.URL:
                self.harvest(value, order)
            return
        if isinstance(value, _CONTAINERS):
            node = Node(value, parent, key, index, embedded, depth, level, zone, order)
            if isinstance(value, dict):
                self.objects.append(node)
            self.queue.append(node)

    def walk_object(self, node: Node, shape: _Shape, values: list[JsonValue]) -> None:
        """Walk an object's values one at a time, charging each as it is met."""
        zone = node.zone
        in_echo = zone is Zone.ECHO
        depth = node.depth + 1
        walked = zip(shape.keys, values, strict=True)
        for position, ((norm, key, is_field, opens), child) in enumerate(walked):
            if not self.tick():
                return
            if is_field:
                node.fields.append((norm, key, child))
            if not in_echo:
                self.keys.add(norm)
                if norm:
                    self.raw_keys.add(key)
            child_zone = zone if opens is None or in_echo else opens
            order = (*node.order, position)
            self.place(child, node, key, None, depth, node.level, child_zone, order, False)

    def walk_array(self, node: Node, value: list[JsonValue]) -> None:
        """Walk an array's values one at a time, charging each as it is met."""
        remaining = self.max_nodes - self.visited
        self.exhausted |= len(value) > remaining
        depth = node.depth + 1
        for index, child in enumerate(islice(value, remaining)):
            if not self.tick():
                return
            order = (*node.order, index)
            self.place(child, node, None, index, depth, node.level, node.zone, order, False)

    def harvest(self, text: str, order: tuple[int, ...]) -> None:
        for index, url in enumerate(_urls_in(text)):
            if not self.tick():
                return
            self.urls.append(((*order, index), url))


def _decode(text: str, *, allow_string: bool) -> tuple[bool, JsonValue]:
    """Decode JSON held in a string; (False, None) when it is not JSON worth reading."""
    text = text.strip()
    if not text or text[0] not in ('{["' if allow_string else "{["):
        return False, None
    # ``loads`` on text with no space around it: a document that ends before the text does
    # is not JSON ("extra data").
    try:
        value: JsonValue
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return False, None
    except ValueError:
        # An integer past the interpreter's digit limit; read such integers as null.
        try:
            return True, _CAREFUL_DECODER.decode(text)
        except (ValueError, RecursionError):
            return False, None
    except RecursionError:
        return False, None
    return (True, value) if end == len(text) else (False, None)


def scan(
    root: JsonValue,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    max_embedded: int = MAX_EMBEDDED,
    bulk: bool = True,
) -> Scan:
    """Walk ``root`` breadth-first within the given bounds; see the module docstring.

    ``bulk=False`` charges every value one at a time; the walk is the same either way.
    """
    return _Walker(max_depth, max_nodes, max_embedded, bulk).run(root)


# -- reading fields -----------------------------------------------------------------------

_MESSAGE_KEYS: Final = frozenset({"msg", "message"})
_ERROR_CODE_KEYS: Final = frozenset({"failcode", "errorcode"})
_ERROR_MESSAGE_KEYS: Final = frozenset({"failmsg", "failmessage", "errormessage", "errormsg"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Flags:
    """The state-like fields of a body, as text, for the per-family maps."""

    state: str | None = None  # Market / Runway ``state``
    status: str | None = None  # Suno-style and 4o ``status``
    success_flag: str | None = None  # ``successFlag``
    has_error: bool = False  # a non-empty error message or a real error code
    has_urls: bool = False  # result URLs were found


@dataclass(frozen=True, slots=True, kw_only=True)
class Fields:
    """The fields a reading looks at, each the first usable value in the objects given."""

    code: int | None = None  # the envelope ``code``
    message: str | None = None  # ``msg`` or ``message``
    stage: str | None = None  # Suno's ``callbackType``
    error_code: str | None = None  # ``failCode`` or ``errorCode``
    error_message: str | None = None  # ``failMsg``, ``errorMessage``, …
    state: str | None = None
    status: str | None = None
    success_flag: str | None = None

    @property
    def has_error(self) -> bool:
        return self.error_code is not None or self.error_message is not None

    def flags(self, *, has_urls: bool) -> Flags:
        """The ``state``, ``status`` and ``successFlag`` fields as :class:`Flags`."""
        return Flags(
            state=self.state,
            status=self.status,
            success_flag=self.success_flag,
            has_error=self.has_error,
            has_urls=has_urls,
        )


def read_fields(nodes: Iterable[Node]) -> Fields:
    """Read every field of :class:`Fields` in one pass over ``nodes``.

    Each field takes the first value its reader accepts, in node order and, within a node,
    in document order; a value the reader refuses (an empty message, a code of 0) is passed
    over for the next one.
    """
    code: int | None = None
    message: str | None = None
    stage: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    state: str | None = None
    status: str | None = None
    success_flag: str | None = None
    for node in nodes:
        for norm, _, value in node.fields:
            if norm == "code":
                if code is None:
                    code = as_int(value)
            elif norm in _MESSAGE_KEYS:
                if message is None:
                    message = message_text(value)
            elif norm == "callbacktype":
                if stage is None:
                    stage = message_text(value)
            elif norm in _ERROR_CODE_KEYS:
                if error_code is None:
                    error_code = error_code_text(value)
            elif norm in _ERROR_MESSAGE_KEYS:
                if error_message is None:
                    error_message = message_text(value)
            elif norm == "state":
                if state is None:
                    state = flag_text(value)
            elif norm == "status":
                if status is None:
                    status = flag_text(value)
            elif norm == "successflag" and success_flag is None:
                success_flag = flag_text(value)
    return Fields(
        code=code,
        message=message,
        stage=stage,
        error_code=error_code,
        error_message=error_message,
        state=state,
        status=status,
        success_flag=success_flag,
    )
