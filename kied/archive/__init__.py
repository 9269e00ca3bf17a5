"""Result files kept by kied: the backends, and where a job's files go.

A backend (:class:`ArchiveBackend`) stores complete local files under keys kied chooses:
``"<job id>/<n><extension>"``, the extension from the file's content type, never from
its URL. :func:`open_archive` opens the configured one.
"""

from __future__ import annotations

import mimetypes
import re
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import trio

from kied.archive._base import ArchiveBackend as ArchiveBackend
from kied.archive._dir import DirArchive as DirArchive
from kied.archive._s3 import S3Backend as S3Backend
from kied.archive._s3 import describe_s3
from kied.archive._s3 import open_s3_backend as open_s3_backend
from kied.settings import DirArchiveSettings, S3ArchiveSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

__all__ = [
    "ArchiveBackend",
    "DirArchive",
    "S3Backend",
    "archive_key",
    "open_archive",
    "open_s3_backend",
]

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
        s3 = _S3OnFirstUse(settings)
        try:
            yield s3
        finally:
            s3.close()
        return
    await trio.to_thread.run_sync(lambda: settings.path.mkdir(parents=True, exist_ok=True))
    yield DirArchive(settings.path)


class _S3OnFirstUse:
    """The S3 backend, built (boto3 imported, its client made: about 0.4 s) when first used.

    ``kied serve`` opens its port before anything slow: the archive is opened before the
    port, so its client is made later, by the leader's first file or the first redirect.
    """

    kind = "s3"

    def __init__(self, settings: S3ArchiveSettings) -> None:
        self._settings = settings
        self._backend: S3Backend | None = None
        self._building = trio.Lock()

    def describe(self) -> str:
        settings = self._settings
        return describe_s3(settings.bucket, settings.prefix, settings.endpoint_url, settings.region)

    async def _s3(self) -> S3Backend:
        async with self._building:
            if self._backend is None:
                settings = self._settings
                build = partial(
                    S3Backend,
                    bucket=settings.bucket,
                    prefix=settings.prefix,
                    endpoint_url=settings.endpoint_url,
                    region=settings.region,
                    access_key_id=settings.access_key_id,
                    secret_access_key=settings.secret_access_key,
                    session_token=settings.session_token,
                )
                try:
                    self._backend = await trio.to_thread.run_sync(build)
                except ValueError as exc:
                    raise OSError(f"S3 {settings.bucket}: {exc}") from None
            return self._backend

    async def put(
        self, key: str, source: Path, *, content_type: str, sha256: str, size: int
    ) -> None:
        s3 = await self._s3()
        await s3.put(key, source, content_type=content_type, sha256=sha256, size=size)

    async def delete(self, keys: Sequence[str]) -> None:
        await (await self._s3()).delete(keys)

    async def exists(self, key: str) -> bool:
        return await (await self._s3()).exists(key)

    async def presign(self, key: str, *, expires_s: float, content_type: str) -> str | None:
        s3 = await self._s3()
        return await s3.presign(key, expires_s=expires_s, content_type=content_type)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
