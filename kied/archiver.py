"""The leader's archiver: keeps every result file of a succeeded job, soon after it succeeds.

When a job succeeds with result URLs and archiving is on, storage marks its files
``pending`` in the same write (see :meth:`kied.store.JobStore.set_archive_mode`). The
archiver hears of it at once (a :class:`~kied.changes.JobChanges` listener) and scans
storage now and then besides, so that what a previous leader left unfinished is done too:
a job's files stay pending in storage until they are all stored.

For each file it downloads the URL (:func:`kied.archive._fetch.download`: http(s) only,
from permitted addresses only, streamed, hashed, bounded in size and time), stores it in
the backend under a key kied chooses, and, once all are stored, records them on the job
with ``job.archived``. A failure is kept in the job's ``last_error`` and tried again on a
schedule (network errors and 5xx); a refusal (address, URL, size) or an answer that will
not change (4xx) gives up at once. A succeeded job stays succeeded whatever happens here.

Archiving runs in tasks of its own, never in a poller, and each file is bounded by
``KIED_ARCHIVE_TIMEOUT``, so a slow file holds up nothing but itself.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from kied.archive import DirArchive, archive_key
from kied.archive._fetch import (
    DownloadFailedError,
    DownloadRefusedError,
    download,
    open_download_client,
)
from kied.core.jobs import ArchivedFile, ArchiveState, Job, JobId
from kied.errors import StoreError

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from kied.archive import ArchiveBackend
    from kied.changes import JobChanges
    from kied.metrics import Metrics
    from kied.settings import Settings
    from kied.store import JobStore

__all__ = ["RETRY_SCHEDULE_S", "Archiver", "empty_trash", "files_url"]

logger = logging.getLogger(__name__)

#: Delays before each new try at a job's files after a failure that may pass; after the
#: last, kied gives up (``kied archive --retry-failed`` starts again). About 80 minutes in
#: all: well within the 24 hours KIE keeps most files, and past most outages.
RETRY_SCHEDULE_S: Final = (1.0, 2.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
#: Jobs read from storage at once.
_BATCH: Final = 100
_STORE_RETRY_S: Final = 1.0


async def empty_trash(store: JobStore, backend: ArchiveBackend, *, timeout_s: float) -> int:
    """Delete from ``backend`` the files of jobs deleted from ``store``; how many jobs'.

    A batch the backend fails to delete (or does not delete within ``timeout_s``) stays
    listed, to be tried again.

    Raises:
        StoreError: storage failed.
    """
    done = 0
    while True:
        trash = await store.archive_trash(limit=_BATCH)
        gone: list[JobId] = []
        for job_id, keys in trash:
            try:
                with trio.fail_after(timeout_s):
                    await backend.delete(keys)
            except (OSError, ValueError, trio.TooSlowError) as exc:
                logger.warning("[ARCHIVE] cannot delete the files of job %s: %s", job_id, exc)
                continue
            gone.append(job_id)
        if gone:
            await store.forget_archive_trash(gone)
            done += len(gone)
        if len(trash) < _BATCH or not gone:
            return done


def _remove_partial_downloads(directory: Path) -> None:
    for leftover in directory.glob(".download-*"):
        leftover.unlink(missing_ok=True)


def files_url(public_url: str | None, job_id: str, n: int) -> str:
    """Where kied serves a job's ``n``-th file: absolute with a public URL, else a path."""
    return f"{(public_url or '').rstrip('/')}/v1/jobs/{job_id}/files/{n}"


class Archiver:
    """Downloads and stores succeeded jobs' result files; see the module docstring.

    Args:
        store: where jobs and their files' state are.
        backend: where files go.
        settings: limits, allowed hosts, the public URL.
        changes: told of every write, so that waiters and events see it.
        metrics: counts files, bytes, failures and refusals.
        now: the wall clock (Unix seconds).
        transport: replaces the network (tests).
    """

    def __init__(
        self,
        *,
        store: JobStore,
        backend: ArchiveBackend,
        settings: Settings,
        changes: JobChanges,
        metrics: Metrics,
        now: Callable[[], float],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._store = store
        self._backend = backend
        self._settings = settings
        self._changes = changes
        self._metrics = metrics
        self._now = now
        self._transport = transport
        self._wake = trio.Event()
        self._running: set[JobId] = set()
        self._files = trio.CapacityLimiter(settings.archive_concurrency)
        if isinstance(backend, DirArchive):
            # Same file system as the archive: the copy into place is a local one.
            self._incoming = backend.root / ".incoming"
        else:
            self._incoming = Path(tempfile.gettempdir()) / "kied-incoming"

    def wake(self) -> None:
        """Look at storage at once (jobs were deleted: their files go too)."""
        self._wake.set()

    def job_changed(self, job: Job) -> None:
        """A job changed: wake at once when its files are pending."""
        if job.archive_state is ArchiveState.PENDING:
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Archive what is due, as it becomes due, until cancelled.

        Cancellation:
            Downloads in flight stop, their partial files are deleted, and their jobs stay
            pending in storage: the next leader starts them again.

        Resource handling:
            The download client is opened and closed here.
        """
        async with (
            open_download_client(
                self._settings.archive_allow_hosts, transport=self._transport
            ) as client,
            trio.open_nursery() as nursery,
        ):
            # What a leader killed mid-download left; only the leader downloads.
            await trio.to_thread.run_sync(_remove_partial_downloads, self._incoming)
            task_status.started()
            while True:
                self._wake = trio.Event()
                try:
                    delay = await self._start_due(nursery, client)
                except StoreError as exc:
                    logger.warning("[ARCHIVE] cannot read pending files: %s", exc)
                    delay = _STORE_RETRY_S
                with trio.move_on_after(delay):
                    await self._wake.wait()

    async def _start_due(self, nursery: trio.Nursery, client: httpx.AsyncClient) -> float:
        """Start every due job not already running; how long to wait before looking again."""
        await self.empty_trash()
        now = self._now()
        for job in await self._store.due_archives(now=now, limit=_BATCH):
            if job.id not in self._running and len(self._running) < _BATCH:
                self._running.add(job.id)
                nursery.start_soon(self._archive_job, client, job)
        self._metrics.archives_pending(await self._store.pending_archives())
        next_at = await self._store.next_archive_at()
        if next_at is None or next_at <= now:
            # Nothing pending, or only what runs now (its end wakes the loop).
            return self._settings.archive_scan_s
        return min(next_at - now, self._settings.archive_scan_s)

    async def empty_trash(self) -> int:
        """Delete the files of jobs retention deleted; how many jobs' files went.

        Raises:
            StoreError: storage failed (what was deleted stays deleted).
        """
        return await empty_trash(self._store, self._backend, timeout_s=self._settings.cleanup_s * 5)

    async def _archive_job(self, client: httpx.AsyncClient, job: Job) -> None:
        try:
            await self._archive(client, job)
        finally:
            self._running.discard(job.id)
            self._wake.set()

    async def _archive(self, client: httpx.AsyncClient, job: Job) -> None:
        files: list[ArchivedFile] = []
        try:
            for n, url in enumerate(job.result_urls):
                files.append(await self._archive_file(client, job, n, url))
        except DownloadRefusedError as exc:
            self._metrics.archive_refused(exc.kind)
            await self._failed(job, f"archive refused: {exc}", retry=False)
            return
        except DownloadFailedError as exc:
            await self._failed(job, f"archive failed: {exc}", retry=exc.retry)
            return
        except trio.TooSlowError:
            limit = self._settings.archive_file_timeout_s
            await self._failed(job, f"archive failed: a file took over {limit:g} s", retry=True)
            return
        except OSError as exc:
            await self._failed(job, f"archive failed: storing a file: {exc}", retry=True)
            return
        try:
            done = await self._store.finish_archive(job.id, files, now=self._now())
        except StoreError as exc:
            logger.warning("[ARCHIVE] job %s: cannot record its files: %s", job.id, exc)
            return  # still pending: tried again at the next scan
        for f in files:
            self._metrics.file_archived(self._backend.kind, f.size)
        if done is not None:
            logger.info(
                "[ARCHIVE] job %s: %d file(s), %d bytes kept",
                job.id,
                len(files),
                sum(f.size for f in files),
                extra={"action": "archived", "job_id": job.id},
            )
            self._changes.wrote(done, ended=False)

    async def _archive_file(
        self, client: httpx.AsyncClient, job: Job, n: int, url: str
    ) -> ArchivedFile:
        async with self._files:
            with trio.fail_after(self._settings.archive_file_timeout_s):
                got = await download(
                    client, url, self._incoming, max_bytes=self._settings.archive_max_bytes
                )
                try:
                    key = archive_key(job.id, n, got.content_type)
                    await self._backend.put(
                        key,
                        got.path,
                        content_type=got.content_type,
                        sha256=got.sha256,
                        size=got.size,
                    )
                finally:
                    with trio.move_on_after(self._settings.cleanup_s, shield=True):
                        await trio.to_thread.run_sync(lambda: got.path.unlink(missing_ok=True))
        return ArchivedFile(
            n=n,
            key=key,
            url=files_url(self._settings.public_url, job.id, n),
            kie_url=url,
            sha256=got.sha256,
            size=got.size,
            content_type=got.content_type,
            archived_at=self._now(),
        )

    async def _failed(self, job: Job, error: str, *, retry: bool) -> None:
        attempt = job.archive_attempts
        next_at: float | None = None
        if retry and attempt < len(RETRY_SCHEDULE_S):
            next_at = self._now() + RETRY_SCHEDULE_S[attempt]
        self._metrics.archive_failed("retry" if next_at is not None else "gave_up")
        log = logger.info if next_at is not None else logger.warning
        log(
            "[ARCHIVE] job %s: %s; %s",
            job.id,
            error,
            "giving up" if next_at is None else f"trying again in {next_at - self._now():g} s",
            extra={"action": "archive_failed", "job_id": job.id},
        )
        try:
            changed = await self._store.fail_archive(
                job.id, error, next_at=next_at, now=self._now()
            )
        except StoreError as exc:
            logger.warning("[ARCHIVE] job %s: cannot record the failure: %s", job.id, exc)
            return
        if changed is not None:
            self._changes.wrote(changed, ended=False)
