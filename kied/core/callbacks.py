"""The callback parser: find the task id and the outcome in whatever arrives at the callback URL.

:func:`parse_callback` never raises and its work is bounded by :class:`ParseLimits`. A payload
it cannot match to a task is a value, :class:`Unrecognised`, not an exception.

Where the task id is looked for, first match wins:

1. ``taskId``/``task_id`` (then ``recordId``) in the body, shallowest first: ``data.taskId``,
   Aleph's root ``taskId``, wrappers (``payload.data.taskId``), arrays (``data[0].taskId``),
   JSON sent inside strings (``data(json).taskId``), form fields (``form:taskId``);
2. a ``taskId``/``task_id`` query parameter of the callback URL;
3. an ``X-Task-Id``-style header;
4. a generic ``id`` at most two levels down (``id``, ``data.id``, ``data[0].id``), so Suno's
   track ids (``data.data[0].id``) are never taken for the task.

Request echoes (``param``, ``promptJson``, …) are never searched: they may name a parent task.

The outcome: a non-200 envelope ``code`` is a failure; Suno's ``callbackType`` decides next
(``text``/``first`` pending, ``complete`` success, ``error`` failure); then a state field
(``state``, ``status``, ``successFlag``) read with the guessed family's map, or, when the
family is unknown, the reading every family agrees on (a value the map does not know is
UNKNOWN, even beside ``code`` 200); then ``code`` 200 is success; an error field alone is a
failure; otherwise UNKNOWN.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias
from urllib.parse import parse_qsl

from kied.core._extract import (
    MAX_DEPTH,
    MAX_EMBEDDED,
    MAX_NODES,
    Node,
    Outcome,
    Scan,
    clean_id,
    flag_text,
    loads_trimmed,
    norm_key,
    read_fields,
    scan,
)
from kied.core.families import Family, _judge, _judge_any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kied.core._json import JsonObject, JsonValue

__all__ = [
    "DEFAULT_LIMITS",
    "CallbackOutcome",
    "Outcome",
    "ParseLimits",
    "Unrecognised",
    "parse_callback",
    "result_to_json",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ParseLimits:
    """Bounds on the work one callback may cost."""

    max_bytes: int = 1 << 20  # larger bodies are not parsed at all
    max_depth: int = MAX_DEPTH  # nesting depth examined
    max_nodes: int = MAX_NODES  # JSON values examined in total
    max_embedded: int = MAX_EMBEDDED  # levels of "JSON inside a string" decoded


DEFAULT_LIMITS: Final = ParseLimits()


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackOutcome:
    """A callback matched to a KIE task."""

    task_id: str
    found_by: str  # where: "data.taskId", "taskId", "query:taskId", "header:X-Task-Id", "id", …
    outcome: Outcome
    result_urls: tuple[str, ...]
    error_code: str | None
    error_message: str | None
    kie_code: int | None  # the envelope "code"
    stage: str | None  # Suno's callbackType: text, first, complete, error
    family: str | None  # best guess, a Family value ("market", "veo", …), or None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unrecognised:
    """A callback with no task id anywhere; the rest is still the best reading of the body."""

    reason: str  # "empty body", "oversized", "invalid JSON", "not a JSON object", "no task id", …
    outcome: Outcome
    result_urls: tuple[str, ...]
    error_code: str | None
    error_message: str | None
    kie_code: int | None
    stage: str | None


def parse_callback(
    body: bytes,
    *,
    query: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str | None = None,
    limits: ParseLimits = DEFAULT_LIMITS,
) -> CallbackOutcome | Unrecognised:
    """Read one callback. Never raises, whatever the input.

    Args:
        body: the raw request body (JSON, a JSON string, or form-encoded).
        query: the callback URL's query parameters, any key case.
        headers: the request headers, any key case.
        content_type: the request's Content-Type, if any.
        limits: bounds on size, depth, values examined and JSON-in-string decoding.

    Returns:
        :class:`CallbackOutcome` when a task id was found, else :class:`Unrecognised`.
    """
    try:
        return _parse(body, query, headers, content_type, limits)
    except Exception as exc:  # the contract is a value for every input: a bug here must not 500
        return _unrecognised(f"parser error: {type(exc).__name__}")


def result_to_json(parsed: CallbackOutcome | Unrecognised) -> JsonObject:
    """The one-object JSON form of a parse result, as ``kied inspect-callback`` prints it."""
    error: JsonValue = None
    if parsed.error_code is not None or parsed.error_message is not None:
        error = {"code": parsed.error_code, "message": parsed.error_message}
    urls: list[JsonValue] = list(parsed.result_urls)
    out: JsonObject = {
        "task_id": None,
        "found_by": None,
        "outcome": parsed.outcome.value,
        "result_urls": urls,
        "error": error,
        "kie_code": parsed.kie_code,
        "stage": parsed.stage,
        "family": None,
    }
    if isinstance(parsed, CallbackOutcome):
        out["task_id"] = parsed.task_id
        out["found_by"] = parsed.found_by
        out["family"] = parsed.family
    else:
        out["reason"] = parsed.reason
    return out


# -- reading the body ---------------------------------------------------------------------


def _unrecognised(reason: str) -> Unrecognised:
    return Unrecognised(
        reason=reason,
        outcome=Outcome.UNKNOWN,
        result_urls=(),
        error_code=None,
        error_message=None,
        kie_code=None,
        stage=None,
    )


def _text_of(body: bytes) -> str:
    # json.detect_encoding knows the UTF-8 BOM and UTF-16/32; bad bytes become U+FFFD. It
    # looks at the first four bytes only, and bodies start alike.
    head = body[:4]
    encoding = _ENCODINGS.get(head)
    if encoding is None:
        encoding = json.detect_encoding(head)
        if len(_ENCODINGS) < _ENCODINGS_SIZE:
            _ENCODINGS[head] = encoding
    text = body.decode(encoding, errors="replace")
    return text.lstrip("\ufeff").strip()


#: json.detect_encoding's answers by a body's first four bytes; past this many different
#: starts the answer is worked out each time.
_ENCODINGS: Final[dict[bytes, str]] = {}
_ENCODINGS_SIZE: Final = 64


_FORMISH: Final = re.compile(r"[^\s=&{}\[\]\"]+=")


def _is_form_type(content_type: str | None) -> bool:
    return content_type is not None and "x-www-form-urlencoded" in content_type.lower()


def _form(text: str, limits: ParseLimits) -> JsonObject:
    # parse_qsl's own max_num_fields raises; cut the field list instead.
    fields = "&".join(text.split("&", limits.max_nodes)[: limits.max_nodes])
    form: JsonObject = {}
    for key, value in parse_qsl(fields, keep_blank_values=True):
        form.setdefault(key, value)
    return form


#: A body read: (its value, why it could not be read, whether it was form-encoded).
_Loaded: TypeAlias = "tuple[JsonValue, str | None, bool]"


def _load(text: str, content_type: str | None, limits: ParseLimits) -> _Loaded:
    if text[0] not in '{["' and (_is_form_type(content_type) or _FORMISH.match(text)):
        return _form(text, limits), None, True
    try:
        return loads_trimmed(text), None, False  # _text_of strips it
    except RecursionError:
        return None, "too deeply nested", False
    except ValueError:
        return None, "invalid JSON", False


# -- the task id --------------------------------------------------------------------------

_QUERY_IDS: Final = frozenset({"taskid"})
_HEADER_IDS: Final = frozenset({"xtaskid", "taskid", "xkietaskid", "kietaskid"})


@dataclass(slots=True)
class _Found:
    task_id: str
    found_by: str
    node: Node | None  # the object holding the id, when it came from the body


def _body_id(hit: tuple[Node, str, str] | None, prefix: str) -> _Found | None:
    if hit is None:
        return None
    node, key, task_id = hit
    return _Found(task_id, prefix + node.path(key), node)


def _side_id(
    pairs: Mapping[str, str] | None, accepted: frozenset[str], label: str, *, header: bool
) -> _Found | None:
    for key, value in (pairs or {}).items():
        if not isinstance(key, str) or norm_key(key) not in accepted:
            continue
        task_id = clean_id(value) if isinstance(value, str) else None
        if task_id is not None:
            shown = "-".join(part.capitalize() for part in key.split("-")) if header else key
            return _Found(task_id, f"{label}:{shown}", None)
    return None


# -- the family ---------------------------------------------------------------------------


def _guess_family(found: Scan, id_node: Node | None, code: int | None) -> Family | None:
    keys = found.keys
    if "callbacktype" in keys:
        lyrics = "text" in keys and keys.isdisjoint(("audiourl", "streamaudiourl"))
        return Family.SUNO_LYRICS if lyrics else Family.SUNO
    if not keys.isdisjoint(_MARKER_KEYS):
        for marker, family in _KEY_MARKERS:
            if not keys.isdisjoint(marker):
                return family
    if "images" in keys:
        return Family.SUNO_COVER
    # MJ and Luma callbacks have the same shape; the request echoed in promptJson differs
    # (MJ requests name a taskType such as mj_txt2img, Luma requests a videoUrl).
    echoed = found.echo_fields()
    for norm, value in echoed:
        if norm == "tasktype" and _starts_mj(value):
            return Family.MJ
    if "resulturls" in keys and "info" not in keys:
        for norm, _ in echoed:
            if norm == "videourl":
                return Family.LUMA
    # 4o's callback spells result_urls in snake case; Veo's info.resultUrls is camel case.
    if "result_urls" in found.raw_keys or ("resulturls" in keys and "progress" in keys):
        return Family.GPT4O
    if "resulturls" in keys and "info" in keys:
        return Family.VEO
    if "state" in keys and "model" in keys:
        return Family.MARKET
    # Only Aleph puts taskId at the root of the envelope, beside code and data.
    if (
        id_node is not None
        and id_node.parent is None
        and code is not None
        and isinstance(id_node.value, dict)
        and "data" in id_node.value
    ):
        return Family.ALEPH
    return None


def _starts_mj(value: JsonValue) -> bool:
    text = flag_text(value)
    return text is not None and text.lower().startswith("mj")


_FAMILY_NAMES: Final = {family: family.value for family in Family}

_KEY_MARKERS: Final = (
    (frozenset({"audiowavurl"}), Family.SUNO_WAV),
    (frozenset({"vocalremovalinfo"}), Family.SUNO_VOCAL),
    (frozenset({"instruments", "mididata"}), Family.SUNO_MIDI),
    (frozenset({"sunodata", "audiourl", "streamaudiourl"}), Family.SUNO),
    (frozenset({"resultjson"}), Family.MARKET),
    (frozenset({"resultvideourl"}), Family.ALEPH),
    (frozenset({"resultimageurl", "originimageurl"}), Family.FLUX_KONTEXT),
    (frozenset({"videoinfo", "videoid", "expireflag", "generateparam"}), Family.RUNWAY),
    (frozenset({"resultinfojson", "resulturl"}), Family.MJ),
    (
        frozenset({"fallbackflag", "originurls", "fullresulturls", "resolution", "imageurls"}),
        Family.VEO,
    ),
)
_MARKER_KEYS: Final = frozenset().union(*(marker for marker, _ in _KEY_MARKERS))


# -- the outcome --------------------------------------------------------------------------


def _decide(code: int | None, stage: str | None, flag: Outcome | None, has_error: bool) -> Outcome:
    if code is not None and code != 200:
        return Outcome.FAIL
    match stage.casefold() if stage is not None else None:
        case "error":
            return Outcome.FAIL
        case "complete":
            return Outcome.SUCCESS
        case "text" | "first":
            return Outcome.PENDING
    if flag is not None:
        return flag
    if code == 200:
        return Outcome.SUCCESS
    return Outcome.FAIL if has_error else Outcome.UNKNOWN


def _parse(
    body: bytes,
    query: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
    content_type: str | None,
    limits: ParseLimits,
) -> CallbackOutcome | Unrecognised:
    if len(body) > limits.max_bytes:
        return _unrecognised("oversized")
    text = _text_of(body)
    value, reason, form = _load(text, content_type, limits) if text else (None, "empty body", False)
    found = scan(
        value,
        max_depth=limits.max_depth,
        max_nodes=limits.max_nodes,
        max_embedded=limits.max_embedded,
        lazy_echoes=True,
    )
    if reason is None and found.containers == 0:
        reason = "not a JSON object"

    prefix = "form:" if form else ""
    if found.task_id is not None:
        node, key, task_id = found.task_id
        hit: _Found | None = _Found(task_id, prefix + node.path(key), node)
    else:
        hit = (
            _side_id(query, _QUERY_IDS, "query", header=False)
            or _side_id(headers, _HEADER_IDS, "header", header=True)
            or _body_id(found.generic_id, prefix)
        )

    # Fields are read from the id's own object and its containers first, then anywhere.
    id_node = hit.node if hit is not None else None
    chain = id_node.chain() if id_node is not None else []
    fields = read_fields(chain + found.objects, has_urls=bool(found.urls))
    code = fields.code
    stage = fields.stage
    error_code, error_message = fields.error_code, fields.error_message
    family = _guess_family(found, id_node, code)
    if family is not None:
        judged = _judge(family, fields)
        flag = judged[0] if judged is not None else None
    else:
        flag = _judge_any(fields)
    outcome = _decide(code, stage, flag, error_code is not None or error_message is not None)
    if code is not None and code != 200:
        error_code = error_code or str(code)
        error_message = error_message or fields.message

    if hit is None:
        return Unrecognised(
            reason=reason or "no task id",
            outcome=outcome,
            result_urls=found.urls,
            error_code=error_code,
            error_message=error_message,
            kie_code=code,
            stage=stage,
        )
    return CallbackOutcome(
        task_id=hit.task_id,
        found_by=hit.found_by,
        outcome=outcome,
        result_urls=found.urls,
        error_code=error_code,
        error_message=error_message,
        kie_code=code,
        stage=stage,
        family=_FAMILY_NAMES[family] if family is not None else None,
    )
