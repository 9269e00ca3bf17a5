"""The archive backend interface: where kied keeps complete result files under its own keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = ["ArchiveBackend"]


class ArchiveBackend(Protocol):
    """Stores complete local files under keys kied chooses (relative POSIX paths such as
    ``"<job_id>/0.png"``, never taken from a URL).

    Every storage failure is an ``OSError`` (or a subclass) whose message names what
    failed and holds no secret. Every call is bounded by the caller (``trio.fail_after``).
    """

    #: "dir" or "s3": for logs and the metric labels
    kind: str

    def describe(self) -> str:
        """Where files go, for logs: no secret in it."""
        ...

    async def put(
        self, key: str, source: Path, *, content_type: str, sha256: str, size: int
    ) -> None:
        """Store the complete local file ``source`` under ``key``, replacing what was there.
        A reader never sees a partial file. ``source`` stays the caller's to delete."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete these keys; a key that does not exist is not an error."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def presign(self, key: str, *, expires_s: float, content_type: str) -> str | None:
        """A short-lived URL that serves the file (S3), or None when kied serves it itself."""
        ...
