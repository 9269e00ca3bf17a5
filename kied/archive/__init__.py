"""Result files kept by kied: the backends, and where a job's files go.

A backend (:class:`ArchiveBackend`) stores complete local files under keys kied chooses:
``"<job id>/<n><extension>"``, the extension from the file's content type, never from
its URL. :func:`open_archive` opens the configured one.
"""

from __future__ import annotations

import mimetypes
import re
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from kied.archive._base import ArchiveBackend as ArchiveBackend
from kied.archive._dir import DirArchive as DirArchive
from kied.errors import ConfigError
from kied.settings import DirArchiveSettings, S3ArchiveSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["ArchiveBackend", "DirArchive", "archive_key", "open_archive"]

#: Extensions kied picks itself for the usual types (mimetypes' choice differs across
#: systems: .jpe, .jfif).
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "audio/mpeg": ".mp3",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "application/json": ".json",
    "text/plain": ".txt",
}


def archive_key(job_id: str, n: int, content_type: str) -> str:
    """The key of a job's ``n``-th result file: ``"<job id>/<n><extension>"``."""
    base = content_type.split(";", 1)[0].strip().lower()
    extension = _EXTENSIONS.get(base) or mimetypes.guess_extension(base) or ".bin"
    if not re.fullmatch(r"\.[a-z0-9]{1,8}", extension):
        extension = ".bin"
    return f"{job_id}/{n}{extension}"


@asynccontextmanager
async def open_archive(
    settings: DirArchiveSettings | S3ArchiveSettings | None,
) -> AsyncIterator[ArchiveBackend | None]:
    """Open the configured archive backend for the length of the block.

    Args:
        settings: where files go; None: they are not kept.

    Yields:
        The backend, or None when archiving is off.

    Raises:
        ConfigError: the backend is not available in this build (``KIED_ARCHIVE``).
        OSError: the directory cannot be made.

    Cancellation:
        Making the directory runs to its end in its thread.

    Resource handling:
        The backend belongs to the block and must not be used after it.
    """
    if settings is None:
        await trio.lowlevel.checkpoint()
        yield None
        return
    if isinstance(settings, S3ArchiveSettings):
        raise ConfigError(
            "KIED_ARCHIVE", "s3:// archives are not available in this build; use dir:PATH"
        )
    await trio.to_thread.run_sync(lambda: settings.path.mkdir(parents=True, exist_ok=True))
    yield DirArchive(settings.path)
