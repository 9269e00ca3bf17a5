"""What kied can keep: text and JSON from requests, checked before anything stores them.

Neither database keeps every string Python can hold: PostgreSQL's text columns reject
NUL, and a lone surrogate (a JSON ``"\\ud800"``) cannot be encoded as UTF-8 at all. JSON
itself has no NaN or Infinity, and a body nested a hundred thousand levels deep would
exhaust the interpreter's stack in whatever reads it next. The API answers such input
with a 400; what must be kept whatever it holds (a callback) is kept with visible escapes.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from kied.core._json import JsonValue

__all__ = ["MAX_DEPTH", "json_problem", "read_json", "text_problem", "visible"]

#: Deepest nesting a request body may have: far more than any job request needs.
MAX_DEPTH: Final = 64

_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is, or None when it can."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain NUL (\\u0000)"
    return f"must not contain a lone surrogate (\\u{ord(found.group()):04x})"


def visible(text: str) -> str:
    """``text`` with NUL and lone surrogates written as ``\\x00`` and ``\\udxxx`` escapes."""
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub(_escape, text)


def _escape(found: re.Match[str]) -> str:
    code = ord(found.group())
    return "\\x00" if code == 0 else f"\\u{code:04x}"


def read_json(data: bytes) -> JsonValue:
    """A request body read as JSON, bounded in depth.

    NaN and Infinity are read as floats (:func:`json_problem` then names where they are).

    Raises:
        ValueError: not JSON (not UTF-8, not well formed) or nested too deeply, with a
            message for the client.
    """
    try:
        value: JsonValue = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError:
        raise ValueError("must be JSON (UTF-8)") from None
    return value


def json_problem(value: JsonValue, *, at: str) -> tuple[str, str] | None:
    """The first place in ``value`` kied could not keep or send, and why; None when none.

    ``at`` names ``value`` itself; places below it are named ``at.key`` and ``at[index]``
    (a key written with :func:`visible` escapes); with ``at`` empty, the keys of ``value``
    are the names. Nesting deeper than :data:`MAX_DEPTH` is named by the outermost place
    (``at``, or a key of ``value``), since the full name would be as deep.
    """
    if not _has_problem(value):
        return None
    # There is one: walk again, naming places this time.
    stack: list[tuple[JsonValue, str, int, str]] = [(value, at, 0, at)]
    while stack:
        node, path, depth, outer = stack.pop()
        if isinstance(node, str):
            problem = text_problem(node)
            if problem is not None:
                return path, problem
        elif isinstance(node, float):
            if not math.isfinite(node):
                return path, "must be a finite number (JSON has no NaN or Infinity)"
        elif isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                return outer or "body", f"nested too deeply (at most {MAX_DEPTH} levels)"
            if isinstance(node, list):
                children = [
                    (child, f"{path}[{i}]", depth + 1, outer or f"[{i}]")
                    for i, child in enumerate(node)
                ]
            else:
                children = []
                for key, child in node.items():
                    name = f"{path}.{visible(key)}" if path else visible(key)
                    problem = text_problem(key)
                    if problem is not None:
                        return name, problem
                    children.append((child, name, depth + 1, outer or name))
            stack.extend(reversed(children))
    return None


def _has_problem(value: JsonValue) -> bool:
    """Whether :func:`json_problem` finds anything: one pass, level by level, naming nothing."""
    level = [value]
    depth = 0
    while level:
        below: list[JsonValue] = []
        for node in level:
            if isinstance(node, str):
                if _UNSTORABLE.search(node) is not None:
                    return True
            elif isinstance(node, float):
                if not math.isfinite(node):
                    return True
            elif isinstance(node, dict):
                if depth >= MAX_DEPTH or any(_UNSTORABLE.search(key) for key in node):
                    return True
                below.extend(node.values())
            elif isinstance(node, list):
                if depth >= MAX_DEPTH:
                    return True
                below.extend(node)
        level = below
        depth += 1
    return False
