"""The callback journal: callbacks kept on local disk while storage is down.

A callback that cannot be stored is appended to ``callbacks.journal`` (one JSON line,
fsynced before the callback is answered) and written to storage by :meth:`replay` once
storage answers again, through the same ``record_callback`` as any callback. Every entry
carries a ``journal_id``; storage keeps one row per id, so an entry replayed twice (after
a crash in the middle of a replay) is stored, and applied, once.

::

    append ──> callbacks.journal ──(rename)──> callbacks.journal.replaying ──> storage
                                                            └── unlinked once all are stored

While entries wait (:attr:`CallbackJournal.waiting`), new callbacks go to the journal too,
so that they reach storage in the order they came.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from kied.core.jobs import EndedBy, EventKind, JobId, Report, TaskId
from kied.errors import StoreError, StoreUnavailableError
from kied.settings import PostgresStoreSettings
from kied.store import InboxEntry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from kied.settings import Settings

__all__ = [
    "CallbackJournal",
    "JournalFullError",
    "journal_directory",
    "new_journal_id",
    "open_journal",
]

logger = logging.getLogger(__name__)

JOURNAL_NAME: Final = "callbacks.journal"
#: Entries being written to storage (``<journal>.replaying``): left behind by a crash,
#: replayed first at the next start.
REPLAYING_SUFFIX: Final = ".replaying"
#: Entries storage refused for good, not for being down (``<journal>.failed``): kept for
#: the operator.
FAILED_SUFFIX: Final = ".failed"
#: Instances that share a directory (several on one host) each take a journal of their
#: own: ``callbacks.journal``, ``callbacks-2.journal``, ... locked while in use. One
#: started later takes the first free one, and so replays what a stopped one left.
_MAX_SLOTS = 16
#: Entries read from the journal per thread call while replaying.
_READ_BATCH = 100


class JournalFullError(Exception):
    """The journal is at its bound: the entry was not kept."""


def new_journal_id() -> str:
    return "jnl_" + uuid.uuid4().hex


def journal_directory(settings: Settings) -> Path:
    """The journal's directory: ``KIED_JOURNAL_DIR``, else beside the SQLite file, else
    ``./var``."""
    if settings.journal_dir is not None:
        return settings.journal_dir
    store = settings.store
    if isinstance(store, PostgresStoreSettings):
        return Path(os.path.abspath("var"))
    return store.path.parent


def open_journal(directory: Path, *, max_bytes: int) -> CallbackJournal:
    """The first journal in ``directory`` no other process uses, locked for this one.

    Raises:
        OSError: the directory cannot be made, or every journal in it is in use.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(1, _MAX_SLOTS + 1):
        name = JOURNAL_NAME if slot == 1 else f"callbacks-{slot}.journal"
        fd = os.open(directory / (name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return CallbackJournal(directory / name, max_bytes=max_bytes, lock_fd=fd)
    raise OSError(f"all {_MAX_SLOTS} journals in {directory} are in use")


class CallbackJournal:
    """An append-only, fsynced file of callbacks that wait for storage.

    Args:
        path: the journal file; its directory must exist.
        max_bytes: bound on the journal's size; an entry beyond it is refused.
        lock_fd: the file descriptor that holds the journal's lock; closed by :meth:`close`.
    """

    def __init__(self, path: Path, *, max_bytes: int, lock_fd: int | None = None) -> None:
        self.directory = path.parent
        self.path = path
        self.replaying_path = path.with_name(path.name + REPLAYING_SUFFIX)
        self.failed_path = path.with_name(path.name + FAILED_SUFFIX)
        self._lock_fd = lock_fd
        self._max_bytes = max_bytes
        self._lock = trio.Lock()  # one append, or the rotation, at a time
        self._limiter = trio.CapacityLimiter(1)
        self._size = _size(self.path) + _size(self.replaying_path)
        #: entries wait to be written to storage
        self.waiting = self._size > 0

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        """Release the journal's lock; another process may take it from then on."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def append(self, entry: InboxEntry, report: Report | None) -> None:
        """Write ``entry`` (with its ``journal_id``) and fsync it.

        Raises:
            JournalFullError: the journal is at its bound; nothing was written.
            OSError: the file could not be written.

        Cancellation: once the write has begun it completes, even when cancelled.
        """
        assert entry.journal_id is not None
        line = json.dumps(_entry_to_json(entry, report), separators=(",", ":")).encode() + b"\n"
        async with self._lock:
            if self._size + len(line) > self._max_bytes:
                raise JournalFullError(
                    f"the journal holds {self._size} bytes, at most {self._max_bytes}"
                )
            self.waiting = True
            await trio.to_thread.run_sync(
                _append_line, self.directory, self.path, line, limiter=self._limiter
            )
            self._size += len(line)

    async def replay(self, record: Callable[[InboxEntry, Report | None], Awaitable[object]]) -> int:
        """Write every waiting entry to storage with ``record``, oldest first; how many.

        The journal is emptied once every entry is stored. An entry storage refuses for
        good goes to ``callbacks.journal.failed``, with a log line.

        Raises:
            StoreUnavailableError: storage is down again; what was not stored stays for
                the next replay.
        """
        replayed = 0
        while True:
            async with self._lock:
                if not self.replaying_path.exists():
                    if _size(self.path) == 0:
                        self.waiting = False
                        self._size = 0
                        return replayed
                    await trio.to_thread.run_sync(
                        _rotate, self.directory, self.path, self.replaying_path
                    )
            offset = 0
            while True:
                batch, offset = await trio.to_thread.run_sync(
                    _read_batch, self.replaying_path, offset, _READ_BATCH
                )
                if not batch:
                    break
                for item in batch:
                    if item is None:
                        continue  # a line torn by a crash while it was written
                    entry, report = item
                    try:
                        await record(entry, report)
                    except StoreUnavailableError:
                        raise
                    except StoreError as exc:
                        logger.error(
                            "[KIE_CALLBACK] journal entry %s refused by storage, kept in %s: %s",
                            entry.journal_id,
                            self.failed_path,
                            exc,
                        )
                        line = json.dumps(_entry_to_json(entry, report)).encode() + b"\n"
                        await trio.to_thread.run_sync(
                            _append_line, self.directory, self.failed_path, line
                        )
                    replayed += 1
            async with self._lock:
                removed = _size(self.replaying_path)
                await trio.to_thread.run_sync(_remove, self.directory, self.replaying_path)
                self._size = max(0, self._size - removed)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_line(directory: Path, path: Path, line: bytes) -> None:
    created = not path.exists()
    if created:
        directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(directory)


def _rotate(directory: Path, path: Path, replaying: Path) -> None:
    os.rename(path, replaying)
    _fsync_dir(directory)


def _remove(directory: Path, path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(directory)


def _read_batch(
    path: Path, offset: int, count: int
) -> tuple[list[tuple[InboxEntry, Report | None] | None], int]:
    """Up to ``count`` entries from byte ``offset``; ``None`` for a line that cannot be read."""
    items: list[tuple[InboxEntry, Report | None] | None] = []
    with path.open("rb") as file:
        file.seek(offset)
        while len(items) < count:
            line = file.readline()
            if not line:
                break
            offset += len(line)
            try:
                items.append(_entry_from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("[KIE_CALLBACK] journal %s: unreadable line skipped: %s", path, exc)
                items.append(None)
    return items, offset


def _entry_to_json(entry: InboxEntry, report: Report | None) -> dict[str, Any]:
    return {
        "journal_id": entry.journal_id,
        "received_at": entry.received_at,
        "body": base64.b64encode(entry.body).decode("ascii"),
        "body_size": entry.body_size,
        "body_sha256": entry.body_sha256,
        "content_type": entry.content_type,
        "query": entry.query,
        "remote": entry.remote,
        "headers": None if entry.headers is None else dict(entry.headers),
        "task_id": entry.task_id,
        "found_by": entry.found_by,
        "job_id": entry.job_id,
        "outcome": entry.outcome,
        "problem": entry.problem,
        "authenticated": entry.authenticated,
        "auth": entry.auth,
        "report": None
        if report is None
        else {
            "event": report.event.value,
            "source": report.source.value,
            "kie_state": report.kie_state,
            "result_urls": list(report.result_urls),
            "result": report.result,
            "error_code": report.error_code,
            "error_message": report.error_message,
        },
    }


def _entry_from_json(data: dict[str, Any]) -> tuple[InboxEntry, Report | None]:
    entry = InboxEntry(
        journal_id=str(data["journal_id"]),
        received_at=float(data["received_at"]),
        body=base64.b64decode(data["body"]),
        body_size=int(data["body_size"]),
        body_sha256=data["body_sha256"],
        content_type=data["content_type"],
        query=data["query"],
        remote=data["remote"],
        headers=data["headers"],
        task_id=None if data["task_id"] is None else TaskId(data["task_id"]),
        found_by=data["found_by"],
        job_id=None if data["job_id"] is None else JobId(data["job_id"]),
        outcome=data["outcome"],
        problem=data["problem"],
        authenticated=bool(data["authenticated"]),
        auth=data["auth"],
    )
    raw = data["report"]
    report = None
    if raw is not None:
        report = Report(
            event=EventKind(raw["event"]),
            source=EndedBy(raw["source"]),
            kie_state=raw["kie_state"],
            result_urls=tuple(raw["result_urls"]),
            result=raw["result"],
            error_code=raw["error_code"],
            error_message=raw["error_message"],
        )
    return entry, report
