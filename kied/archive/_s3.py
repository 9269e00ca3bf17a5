"""The S3 backend: result files kept in a bucket of AWS S3 or an S3-compatible store.

Library: boto3, called synchronously in worker threads (``trio.to_thread.run_sync`` with the
backend's own ``CapacityLimiter``). obstore was the other candidate; its async API is built on
a bridge from tokio to asyncio's event loop and fails under Trio ("no running event loop"), so
it too would have run through threads, and then boto3 is the better-known road: the reference
client that R2, MinIO, B2 and the rest test against, with knobs for their differences
(path-style addressing, checksum behaviour), multipart uploads of big files with
``upload_fileobj``/``TransferConfig`` (an object appears only once the upload is complete, so a
reader never sees part of one), presigned URLs that set the response content type, type stubs
for mypy, and a real test server (moto). boto3 takes about 0.4 s to import and build a
client, so it is imported only when an S3 archive is opened, never at ``kied serve`` start-up.

Compatibility: with an endpoint URL (R2, MinIO, B2, ...) requests use path-style addressing
(``endpoint/bucket/key``); the region is ``us-east-1`` unless one is given. boto3 1.36 and
later add CRC32 checksums to every upload and ask for them on downloads, which some
S3-compatible stores reject; the backend sets ``request_checksum_calculation`` and
``response_checksum_validation`` to ``"when_required"``, so checksums are sent only where the
S3 API demands them. Deletes are one ``DeleteObject`` per key, not ``DeleteObjects``, because
the batch call needs a body checksum (Content-MD5 or CRC32, depending on the version) that
not every store accepts.

Credentials: the ones given, or else boto3's usual chain (its environment variables, its
configuration files, an instance or task role).
"""

from __future__ import annotations

import math
import os
import re
import threading
from contextlib import asynccontextmanager
from functools import partial
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from pathlib import Path

    from mypy_boto3_s3 import S3Client

__all__ = ["S3Backend", "describe_s3", "open_s3_backend"]

_T = TypeVar("_T")

_DEFAULT_REGION: Final = "us-east-1"

MIB: Final = 1024 * 1024

#: SigV4 presigned URLs live at most seven days.
_PRESIGN_MAX_S: Final = 7 * 24 * 3600

#: HTTP answers and error codes that mean "no such key" for HeadObject (which has no body,
#: so only the status says it).
_MISSING: Final = frozenset({"404", "NoSuchKey", "NotFound"})


class _StopUploadError(Exception):
    """Raised inside an upload's progress callback to stop it once its caller is cancelled."""


class S3Backend:
    """:class:`~kied.archive.ArchiveBackend` on an S3 bucket: keys go under ``prefix``.

    Args:
        bucket: the bucket (it must exist; kied never creates one).
        prefix: prepended to every key, with a ``/`` between; ``""`` for none. Leading and
            trailing slashes are ignored.
        endpoint_url: an S3-compatible store's URL (R2, MinIO, B2, ...); ``None`` for AWS.
        region: the bucket's region; ``None`` means ``us-east-1``.
        access_key_id, secret_access_key, session_token: credentials; ``None`` leaves them
            to boto3's usual chain.
        multipart_threshold: files at least this big go up in parts ...
        multipart_chunksize: ... of this size, ``part_concurrency`` at a time.
        part_concurrency: parts of one file in flight at once.
        connect_timeout_s, read_timeout_s: bounds on each HTTP request.
        max_attempts: tries per request (the first included), for throttling, 5xx and
            network errors, with boto3's backoff.
        threads: calls in flight at once.

    Raises:
        ValueError: a bad bucket name or number.

    Cancellation:
        Each call runs in a worker thread. A cancelled call returns at once; its thread
        finishes on its own, bounded by the request timeouts, and a cancelled upload stops at
        its next part (a multipart upload is aborted, its parts removed).

    Resource handling:
        Owns one boto3 client (its HTTP connection pool), closed by :meth:`close`.
        :func:`open_s3_backend` builds the backend in a thread and closes it after the block.
    """

    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        multipart_threshold: int = 16 * MIB,
        multipart_chunksize: int = 16 * MIB,
        part_concurrency: int = 4,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        max_attempts: int = 3,
        threads: int = 4,
    ) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
            raise ValueError(f"not an S3 bucket name: {bucket!r}")
        if multipart_chunksize < 5 * MIB or multipart_threshold < 1:
            raise ValueError("S3 parts are at least 5 MiB")
        if min(part_concurrency, max_attempts, threads) < 1:
            raise ValueError("part_concurrency, max_attempts and threads must be >= 1")
        if not (0 < connect_timeout_s < math.inf and 0 < read_timeout_s < math.inf):
            raise ValueError("timeouts must be finite seconds > 0")
        # Imported here, so that kied without an S3 archive never pays for boto3.
        import boto3.session
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region or _DEFAULT_REGION
        self._secrets = tuple(
            s for s in (access_key_id, secret_access_key, session_token) if s and len(s) >= 4
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            region_name=self.region,
        )
        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=threads * part_concurrency + threads,
        )
        self._client: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=part_concurrency,
            use_threads=part_concurrency > 1,
        )
        self._limiter = trio.CapacityLimiter(threads)

    def describe(self) -> str:
        return describe_s3(self.bucket, self.prefix, self.endpoint_url, self.region)

    def close(self) -> None:
        """Close the client's connections. Calls still in flight fail."""
        self._client.close()

    def object_key(self, key: str) -> str:
        """The bucket key that ``key`` is stored under: the prefix, then ``key``.

        Raises:
            ValueError: the key is empty, absolute, or holds ``..``, ``.``, an empty part, a
                backslash or a control character.
        """
        if (
            not key
            or PurePosixPath(key).is_absolute()
            or "\\" in key
            or any(ord(c) < 0x20 or c == "\x7f" for c in key)
            or any(part in ("", ".", "..") for part in key.split("/"))
        ):
            raise ValueError(f"not an archive key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    # ---------------------------------------------------------------------------------------
    # The interface

    async def put(
        self, key: str, source: Path, *, content_type: str, sha256: str, size: int
    ) -> None:
        """Upload ``source`` to ``key``; in parts from ``multipart_threshold`` bytes on.

        The object carries ``Content-Type`` and its SHA-256 as the metadata ``sha256``.

        Raises:
            OSError: ``S3 put bucket/key: reason``, for the store's refusal, the network, or
                a source that is not ``size`` bytes.
            ValueError: a bad key.
        """
        name = self.object_key(key)
        stop = threading.Event()

        def progress(_: int) -> None:
            if stop.is_set():
                raise _StopUploadError("cancelled")

        def upload() -> None:
            # The file is opened here, not by s3transfer, so that it is closed whatever
            # happens to the upload, a stopped one included.
            with source.open("rb") as file:
                actual = os.fstat(file.fileno()).st_size
                if actual != size:
                    raise OSError(f"the file is {actual} bytes, not {size}")
                self._client.upload_fileobj(
                    file,
                    self.bucket,
                    name,
                    ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": sha256}},
                    Callback=progress,
                    Config=self._transfer,
                )

        try:
            await self._call("put", name, upload)
        except BaseException:
            stop.set()
            raise

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (a missing key is fine), one request per key.

        Raises:
            OSError: ``S3 delete bucket/key: reason``, naming the first key that failed.
            ValueError: a bad key.
        """
        names = [self.object_key(key) for key in keys]
        for name in names:
            await self._call(
                "delete", name, partial(self._client.delete_object, Bucket=self.bucket, Key=name)
            )

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored.

        A HEAD answer has no body, so a missing bucket (404 too) also reads as ``False``;
        :meth:`put` and :meth:`delete` name it. Without the ``s3:ListBucket`` permission, AWS
        answers 403 for a missing key, which is an ``OSError`` here.

        Raises:
            OSError: ``S3 exists bucket/key: reason`` for anything but "not found".
            ValueError: a bad key.
        """
        name = self.object_key(key)

        def head() -> bool:
            from botocore.exceptions import ClientError

            try:
                self._client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if _error_code(exc) in _MISSING:
                    return False
                raise
            return True

        return await self._call("exists", name, head)

    async def presign(self, key: str, *, expires_s: float, content_type: str) -> str | None:
        """A GET URL for ``key``, valid for ``expires_s`` (whole seconds, rounded up), that
        answers with ``Content-Type: content_type``.

        Signing needs no request to the store; the URL works only while the object exists.

        Raises:
            OSError: ``S3 presign bucket/key: reason`` (no credentials, for one).
            ValueError: a bad key, or ``expires_s`` outside (0, 7 days].
        """
        name = self.object_key(key)
        if not (0 < expires_s <= _PRESIGN_MAX_S):
            raise ValueError(f"expires_s must be in (0, {_PRESIGN_MAX_S}], got {expires_s}")
        sign = partial(
            self._client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": name, "ResponseContentType": content_type},
            ExpiresIn=math.ceil(expires_s),
            HttpMethod="GET",
        )
        return await self._call("presign", name, sign)

    # ---------------------------------------------------------------------------------------

    async def _call(self, what: str, name: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in a worker thread; its failures become ``OSError`` without secrets."""
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)
        except ValueError:
            raise
        except Exception as exc:
            raise OSError(f"S3 {what} {self.bucket}/{name}: {self._reason(exc)}") from None

    def _reason(self, exc: BaseException) -> str:
        from botocore.exceptions import ClientError

        cause: BaseException = exc
        # s3transfer wraps the store's answer (S3UploadFailedError); find the ClientError.
        while not isinstance(cause, ClientError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ClientError):
            code = _error_code(cause)
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = str(cause.response.get("Error", {}).get("Message") or "").strip()
            reason = f"{code} (HTTP {status})" if status is not None else code
            if message and message != code:
                reason += f": {message}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return self._scrub(reason)[:500]

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        # presigned URLs and signed headers, should a message quote one
        text = re.sub(r"(Signature|Credential|Security-Token)=[^&\s,]+", r"\1=***", text)
        # credentials in a URL's user part (an endpoint URL, for one)
        return re.sub(r"//[^/@\s]*@", "//", text)


def describe_s3(bucket: str, prefix: str, endpoint_url: str | None, region: str | None) -> str:
    """Where an S3 archive keeps files, for logs: no credentials in it."""
    where = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if endpoint_url is None:
        return f"{where} in {region or _DEFAULT_REGION}"
    return f"{where} at {_without_userinfo(endpoint_url)}"


def _error_code(exc: Any) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@asynccontextmanager
async def open_s3_backend(
    *,
    bucket: str,
    prefix: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
    **tuning: Any,
) -> AsyncIterator[S3Backend]:
    """An :class:`S3Backend` for the length of the block.

    Args:
        bucket, prefix, endpoint_url, region, access_key_id, secret_access_key,
        session_token: as for :class:`S3Backend`.
        tuning: :class:`S3Backend`'s other keyword arguments (part sizes, timeouts).

    Yields:
        The backend. Nothing is sent to the store until it is used.

    Raises:
        ValueError: a bad bucket name or number.

    Cancellation:
        Building the client (importing boto3, about 0.4 s) runs in a thread; a cancellation
        then waits for it.

    Resource handling:
        The client is closed when the block exits; the backend must not be used after.
    """
    build = partial(
        S3Backend,
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint_url,
        region=region,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        session_token=session_token,
        **tuning,
    )
    backend = await trio.to_thread.run_sync(build)
    try:
        yield backend
    finally:
        # Closing a connection pool does not wait on the network.
        backend.close()
