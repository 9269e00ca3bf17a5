"""The daemon's error answers as one line, for everything that reads them back.

:mod:`kied.client_cli`, :mod:`kied._demo` and :mod:`kied.client` all turn an answer such as
``{"error": "invalid request", "field": "input", "detail": "must be ..."}`` into words; the
words are made here so that none of them imports another for it.
"""

from __future__ import annotations

__all__ = ["api_error_line", "error_line", "one_line"]


def api_error_line(status: int, body: object, text: str = "") -> str:
    """The daemon's error answer as one line, the field it names first, for the command line.

    ``{"error": "invalid request", "field": "input", "detail": "must be ..."}`` becomes
    ``input: must be ... (HTTP 400 invalid request)``. A 401 says how to give the token.
    """
    if status == 401:
        return (
            "the daemon wants its API token: set KIED_API_TOKEN or pass --token "
            "(HTTP 401 unauthorized)"
        )
    return error_line(status, body, text)


def error_line(status: int, body: object, text: str = "") -> str:
    """Like :func:`api_error_line`, but every status in the API's own words."""
    if isinstance(body, dict):
        error = body.get("error")
        field = body.get("field")
        detail = body.get("detail")
        parts = [str(p) for p in (field, detail) if p]
        message = ": ".join(parts) or str(error or "")
        label = f"HTTP {status} {error}" if error else f"HTTP {status}"
        if message:
            return one_line(f"{message} ({label})")
    snippet = one_line(text)[:200]
    return f"HTTP {status}" + (f": {snippet}" if snippet else "")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, made one space."""
    return " ".join(text.split())
