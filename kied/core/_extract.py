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
from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from kied.core._json import JsonObject, JsonValue

__all__ = [
    "MAX_DEPTH",
    "MAX_EMBEDDED",
    "MAX_NODES",
    "FieldView",
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
    "read_error",
    "read_flags",
    "scan",
]

T = TypeVar("T")

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

    objects: list[Node]  # every object, in the order visited (shallow first)
    urls: tuple[str, ...]  # result URLs, best first, without duplicates
    keys: frozenset[str]  # normalised keys seen outside request echoes
    raw_keys: frozenset[str]  # the same keys as sent
    containers: int  # objects and arrays met
    visited: int  # values examined: the work done
    exhausted: bool  # the node budget ran out before the walk ended


class _Walker:
    def __init__(self, *, max_depth: int, max_nodes: int, max_embedded: int) -> None:
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.max_embedded = max_embedded
        self.queue: deque[Node] = deque()
        self.objects: list[Node] = []
        self.urls: list[tuple[tuple[int, ...], str]] = []
        self.keys: set[str] = set()
        self.raw_keys: set[str] = set()
        self.containers = 0
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
            self.place(
                value,
                parent=None,
                key=None,
                index=None,
                depth=0,
                level=level,
                zone=Zone.NORMAL,
                order=(),
                embedded=level > 0,
            )
        while self.queue and not self.exhausted:
            node = self.queue.popleft()
            if isinstance(node.value, dict):
                self.expand_object(node, node.value)
            else:
                self.expand_array(node, node.value)
        return Scan(
            objects=self.objects,
            # Breadth-first finds shallow things first; results read best in document order.
            urls=tuple(dict.fromkeys(url for _, url in sorted(self.urls))),
            keys=frozenset(self.keys),
            raw_keys=frozenset(self.raw_keys),
            containers=self.containers,
            visited=self.visited,
            exhausted=self.exhausted,
        )

    def place(
        self,
        value: JsonValue,
        *,
        parent: Node | None,
        key: str | None,
        index: int | None,
        depth: int,
        level: int,
        zone: Zone,
        order: tuple[int, ...],
        embedded: bool = False,
    ) -> None:
        if depth > self.max_depth:
            return
        if isinstance(value, str):
            if level < self.max_embedded:
                ok, decoded = _decode(value, allow_string=False)
                if ok:
                    self.place(
                        decoded,
                        parent=parent,
                        key=key,
                        index=index,
                        depth=depth,
                        level=level + 1,
                        zone=zone,
                        order=order,
                        embedded=True,
                    )
                    return
            if zone is Zone.URL:
                self.harvest(value, order)
            return
        if not isinstance(value, dict | list):
            return
        node = Node(
            value=value,
            parent=parent,
            key=key,
            index=index,
            embedded=embedded,
            depth=depth,
            level=level,
            zone=zone,
            order=order,
        )
        self.containers += 1
        if isinstance(value, dict):
            self.objects.append(node)
        self.queue.append(node)

    def expand_object(self, node: Node, value: JsonObject) -> None:
        items = list(islice(value.items(), self.max_nodes - self.visited))
        self.exhausted |= len(items) < len(value)
        normed = [(norm_key(key), key, child) for key, child in items]
        # Result keys first, best first; the rest keep document order (the sort is stable).
        normed.sort(key=lambda item: _URL_RANK.get(item[0], len(_URL_KEYS)))
        for position, (norm, key, child) in enumerate(normed):
            if not self.tick():
                return
            if norm in _FIELDS:
                node.fields.append((norm, key, child))
            if node.zone is not Zone.ECHO:
                self.keys.add(norm)
                if norm:
                    self.raw_keys.add(key)
            self.place(
                child,
                parent=node,
                key=key,
                index=None,
                depth=node.depth + 1,
                level=node.level,
                zone=_child_zone(node.zone, norm),
                order=(*node.order, position),
            )

    def expand_array(self, node: Node, value: list[JsonValue]) -> None:
        self.exhausted |= len(value) > self.max_nodes - self.visited
        for index, child in enumerate(islice(value, self.max_nodes - self.visited)):
            if not self.tick():
                return
            self.place(
                child,
                parent=node,
                key=None,
                index=index,
                depth=node.depth + 1,
                level=node.level,
                zone=node.zone,
                order=(*node.order, index),
            )

    def harvest(self, text: str, order: tuple[int, ...]) -> None:
        for index, url in enumerate(_urls_in(text)):
            if not self.tick():
                return
            self.urls.append(((*order, index), url))


def _child_zone(zone: Zone, norm: str) -> Zone:
    if zone is Zone.ECHO or norm in _ECHO_KEYS:
        return Zone.ECHO
    if zone is Zone.URL or norm in _URL_RANK:
        return Zone.URL
    return Zone.NORMAL


def _decode(text: str, *, allow_string: bool) -> tuple[bool, JsonValue]:
    """Decode JSON held in a string; (False, None) when it is not JSON worth reading."""
    text = text.strip()
    if not text or text[0] not in ('{["' if allow_string else "{["):
        return False, None
    try:
        return True, loads(text)
    except (ValueError, RecursionError):
        return False, None


def scan(
    root: JsonValue,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    max_embedded: int = MAX_EMBEDDED,
) -> Scan:
    """Walk ``root`` breadth-first within the given bounds; see the module docstring."""
    walker = _Walker(max_depth=max_depth, max_nodes=max_nodes, max_embedded=max_embedded)
    return walker.run(root)


# -- reading fields -----------------------------------------------------------------------


class FieldView:
    """Reads fields from a sequence of objects, the first that has a usable value winning."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self._nodes = nodes

    def first(self, names: Sequence[str], read: Callable[[JsonValue], T | None]) -> T | None:
        for node in self._nodes:
            for norm, _key, value in node.fields:
                if norm in names:
                    got = read(value)
                    if got is not None:
                        return got
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Flags:
    """The state-like fields of a body, as text, for the per-family maps."""

    state: str | None = None  # Market / Runway ``state``
    status: str | None = None  # Suno-style and 4o ``status``
    success_flag: str | None = None  # ``successFlag``
    has_error: bool = False  # a non-empty error message or a real error code
    has_urls: bool = False  # result URLs were found


def read_error(view: FieldView) -> tuple[str | None, str | None]:
    """(code, message) from ``failCode``/``failMsg`` or ``errorCode``/``errorMessage``."""
    code = view.first(("failcode", "errorcode"), error_code_text)
    message = view.first(("failmsg", "failmessage", "errormessage", "errormsg"), message_text)
    return code, message


def read_flags(view: FieldView, *, has_error: bool, has_urls: bool) -> Flags:
    """The ``state``, ``status`` and ``successFlag`` fields as :class:`Flags`."""
    return Flags(
        state=view.first(("state",), flag_text),
        status=view.first(("status",), flag_text),
        success_flag=view.first(("successflag",), flag_text),
        has_error=has_error,
        has_urls=has_urls,
    )
