"""kied's exceptions.

::

    KiedError
    ├── ConfigError              a setting is missing or wrong (one line names it)
    ├── IllegalTransitionError   a job event that the state table does not allow
    ├── StoreError
    │   ├── StoreUnavailableError  the database cannot be reached or answered with an error
    │   │   └── StoreMisconfiguredError  it never will: unknown database or role, bad
    │   │                                password, a data directory kied cannot write
    │   └── ConflictError          a write lost to a concurrent one (compare-and-set)
    ├── LeadershipLostError      the leadership lock was lost while ACTIVE
    └── UpstreamError            KIE answered badly or not at all
        ├── UpstreamBusyError      transient (429, 455, 5xx, network): try again later
        │   └── UpstreamTimeoutError  KIE did not answer in time
        └── UpstreamRejectedError  KIE refused the request (401, 402, 422, ...)

Malformed callbacks are not errors: the parser returns values.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "IllegalTransitionError",
    "KiedError",
    "LeadershipLostError",
    "StoreError",
    "StoreMisconfiguredError",
    "StoreUnavailableError",
    "UpstreamBusyError",
    "UpstreamError",
    "UpstreamRejectedError",
    "UpstreamTimeoutError",
]


class KiedError(Exception):
    """The root of kied's own exceptions."""


class ConfigError(KiedError):
    """A setting is missing or invalid; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class IllegalTransitionError(KiedError):
    """The job state table has no transition for this (state, event) pair."""


class StoreError(KiedError):
    """Storage failed."""


class StoreUnavailableError(StoreError):
    """The database could not be reached, or refused the operation."""


class StoreMisconfiguredError(StoreUnavailableError):
    """The database refuses kied for good: trying again cannot help until the setting changes.

    An unknown database or role, a wrong password, no ``pg_hba.conf`` entry, or a SQLite
    file in a directory that is not one or cannot be written. The message holds no password.
    """


class ConflictError(StoreError):
    """A concurrent writer won a compare-and-set."""


class LeadershipLostError(KiedError):
    """The leadership lock was lost while this instance was ACTIVE."""


class UpstreamError(KiedError):
    """KIE answered with an error, or not at all."""


class UpstreamBusyError(UpstreamError):
    """KIE could not answer now (rate limit, maintenance, server or network trouble).

    Transient: the same request may succeed later, after ``retry_after_s`` if KIE said so.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        retry_after_s: float | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        super().__init__(message)
        #: the envelope code or HTTP status that said so; None for network trouble
        self.code = code
        #: seconds KIE asked to wait (``Retry-After``), if it did
        self.retry_after_s = retry_after_s
        #: the request may have reached KIE and been acted on, but no answer came back
        #: (a timeout or a connection lost after sending); False when KIE answered, or
        #: when the request never left (no connection could be made)
        self.outcome_unknown = outcome_unknown


class UpstreamTimeoutError(UpstreamBusyError):
    """KIE did not answer in time (``outcome_unknown`` unless the connection was never made)."""


class UpstreamRejectedError(UpstreamError):
    """KIE refused the request; retrying will not help."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"KIE refused the request: code {code}: {message}")
        self.code = code
        self.message = message
