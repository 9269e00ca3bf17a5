"""The ways the simulated KIE misbehaves: broken callback bodies and failed status answers.

Each kind imitates something KIE's documentation or public reports warn about, so that kied's
parser and poller meet them in tests before they meet them in production.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Final

from kied.kie._sim_families import Reply, dumps

__all__ = [
    "MalformedKind",
    "StatusErrorKind",
    "encode_callback",
    "status_error_reply",
]


class MalformedKind(StrEnum):
    """How a malformed callback body is broken."""

    #: not JSON at all (Python-literal quoting: single quotes, ``None``, ``True``)
    INVALID_JSON = "invalid-json"
    #: valid JSON cut off half way
    TRUNCATED = "truncated"
    #: a correct body sent as ``text/plain``
    WRONG_CONTENT_TYPE = "wrong-content-type"
    #: ``data`` is a JSON *string* holding the object, not the object
    STRING_DATA = "string-data"
    #: no body at all
    EMPTY = "empty"
    #: valid JSON whose top level is an array, not an object
    NOT_AN_OBJECT = "not-an-object"


class StatusErrorKind(StrEnum):
    """How a status query is refused."""

    #: HTTP 429 carrying a 429 envelope
    HTTP_429 = "http-429"
    #: HTTP 200 carrying ``{"code": 429}``
    ENVELOPE_429 = "envelope-429"
    #: HTTP 200 carrying ``{"code": 455}`` (maintenance)
    ENVELOPE_455 = "envelope-455"
    #: HTTP 200 carrying ``{"code": 500}``
    ENVELOPE_500 = "envelope-500"
    #: HTTP 500 carrying a 500 envelope
    HTTP_500 = "http-500"
    #: HTTP 502 with an HTML page, as a proxy in front of KIE would send
    HTTP_502 = "http-502"
    #: HTTP 503 with a plain-text body and ``Retry-After``
    HTTP_503 = "http-503"


_JSON: Final = "application/json"


def encode_callback(body: dict[str, Any], kind: MalformedKind | None) -> tuple[bytes, str]:
    """Serialise a callback body, broken in the way ``kind`` says (or intact for ``None``).

    Returns:
        The bytes to POST and the ``Content-Type`` to send them with.
    """
    good = dumps(body)
    match kind:
        case None:
            return good, _JSON
        case MalformedKind.INVALID_JSON:
            return repr(body).encode(), _JSON
        case MalformedKind.TRUNCATED:
            return good[: len(good) // 2], _JSON
        case MalformedKind.WRONG_CONTENT_TYPE:
            return good, "text/plain; charset=utf-8"
        case MalformedKind.STRING_DATA:
            return dumps({**body, "data": json.dumps(body.get("data"))}), _JSON
        case MalformedKind.EMPTY:
            return b"", _JSON
        case MalformedKind.NOT_AN_OBJECT:
            return dumps([body]), _JSON


_RATE_LIMITED: Final = "Rate Limited - Request limit has been exceeded for this resource"
_MAINTENANCE: Final = "Service Unavailable - System is currently undergoing maintenance"
_SERVER_ERROR: Final = "Server Error - An unexpected error occurred while processing the request"
_BAD_GATEWAY_PAGE: Final = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center></body></html>"
)


def status_error_reply(kind: StatusErrorKind) -> Reply:
    """The answer a refused status query gets."""
    match kind:
        case StatusErrorKind.HTTP_429:
            return Reply.envelope(429, _RATE_LIMITED, http_status=429)
        case StatusErrorKind.ENVELOPE_429:
            return Reply.envelope(429, _RATE_LIMITED)
        case StatusErrorKind.ENVELOPE_455:
            return Reply.envelope(455, _MAINTENANCE)
        case StatusErrorKind.ENVELOPE_500:
            return Reply.envelope(500, _SERVER_ERROR)
        case StatusErrorKind.HTTP_500:
            return Reply.envelope(500, _SERVER_ERROR, http_status=500)
        case StatusErrorKind.HTTP_502:
            return Reply(502, _BAD_GATEWAY_PAGE, "text/html")
        case StatusErrorKind.HTTP_503:
            return Reply(503, b"Service Unavailable", "text/plain", (("Retry-After", "5"),))
