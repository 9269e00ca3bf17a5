"""The JobStore contract for archived result files, run against every store."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from kied.core.jobs import ArchivedFile, ArchiveState, EndedBy, EventKind, JobId, JobState, Report
from kied.testing import make_new_job
from tests.integration.test_store_contract import STORES, Scratch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from kied.store import JobStore
    from tests.pg import PgDatabases

_URLS = ("https://cdn.example/a.png", "https://cdn.example/b.mp4")


@pytest.fixture(params=sorted(STORES))
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_databases: PgDatabases
) -> AsyncIterator[JobStore]:
    async with STORES[request.param](Scratch(tmp_path, pg_databases)) as store:
        yield store


def _success(urls: tuple[str, ...] = _URLS) -> Report:
    return Report(
        event=EventKind.SUCCEEDED, source=EndedBy.CALLBACK, kie_state="success", result_urls=urls
    )


def _files(job_id: str) -> list[ArchivedFile]:
    return [
        ArchivedFile(
            n=n,
            key=f"{job_id}/{n}.png",
            url=f"/v1/jobs/{job_id}/files/{n}",
            kie_url=url,
            sha256="ab" * 32,
            size=10 + n,
            content_type="image/png",
            archived_at=2_000.0,
        )
        for n, url in enumerate(_URLS)
    ]


async def _succeeded(store: JobStore, urls: tuple[str, ...] = _URLS) -> JobId:
    job, _ = await store.create_job(make_new_job(task_id="t-" + str(id(urls)) + str(len(urls))))
    changed = await store.apply(job.id, _success(urls), now=1_500.0)
    assert changed is not None
    return job.id


async def _types(store: JobStore, job_id: JobId) -> list[str]:
    return [e.type for e in await store.list_events(limit=1000) if e.job_id == job_id]


async def test_archiving_off_marks_nothing(store: JobStore) -> None:
    job_id = await _succeeded(store)
    job = await store.get_job(job_id)
    assert job is not None
    assert job.archive_state is None
    assert await store.due_archives(now=1e12, limit=10) == []
    assert await store.next_archive_at() is None
    assert await store.pending_archives() == 0


async def test_a_success_with_urls_is_pending_then_archived(store: JobStore) -> None:
    await store.set_archive_mode("on")
    job_id = await _succeeded(store)
    nothing, _ = await store.create_job(make_new_job(task_id="t-none"))
    await store.apply(nothing.id, _success(()), now=1_500.0)
    assert await store.next_archive_at() == 1_500.0
    assert await store.pending_archives() == 1
    assert await store.due_archives(now=1_499.0, limit=10) == []
    [due] = await store.due_archives(now=1_500.0, limit=10)
    assert (due.id, due.archive_state, due.archive_attempts) == (job_id, "pending", 0)
    # the success is told at once; the files' event follows once they are kept
    assert await _types(store, job_id) == ["job.created", "job.succeeded"]

    files = _files(job_id)
    done = await store.finish_archive(job_id, files, now=2_000.0)
    assert done is not None
    assert done.archive_state is ArchiveState.ARCHIVED
    assert done.files == tuple(files)
    assert done.state is JobState.SUCCEEDED
    assert await store.get_job(job_id) == done
    assert await store.pending_archives() == 0
    assert await store.next_archive_at() is None
    assert await _types(store, job_id) == ["job.created", "job.succeeded", "job.archived"]
    [event] = [e for e in await store.list_events() if e.type == "job.archived"]
    assert [f["sha256"] for f in event.job["files"]] == ["ab" * 32] * 2  # type: ignore[index,union-attr]
    # a repeat is a no-op
    assert await store.finish_archive(job_id, files, now=2_001.0) is None


async def test_failures_are_retried_then_given_up(store: JobStore) -> None:
    await store.set_archive_mode("on")
    job_id = await _succeeded(store)
    later = await store.fail_archive(job_id, "archive: 503", next_at=1_600.0, now=1_501.0)
    assert later is not None
    assert (later.archive_state, later.archive_attempts, later.last_error) == (
        "pending",
        1,
        "archive: 503",
    )
    assert later.state is JobState.SUCCEEDED
    assert await store.next_archive_at() == 1_600.0
    given_up = await store.fail_archive(job_id, "archive: gone", next_at=None, now=1_601.0)
    assert given_up is not None
    assert (given_up.archive_state, given_up.archive_attempts) == ("failed", 2)
    assert await store.fail_archive(job_id, "again", next_at=None, now=1_602.0) is None
    assert await _types(store, job_id) == ["job.created", "job.succeeded"]

    assert await store.retry_archives(None, now=1_700.0) == [job_id]
    again = await store.get_job(job_id)
    assert again is not None
    assert (again.archive_state, again.archive_attempts, again.archive_next_at) == (
        "pending",
        0,
        1_700.0,
    )
    assert await store.retry_archives(None, now=1_701.0) == []
    # by id: only a succeeded job with URLs that is not pending
    assert await store.retry_archives([job_id, JobId("no-such-job")], now=1_702.0) == []
    await store.finish_archive(job_id, _files(job_id), now=1_800.0)
    assert await store.retry_archives([job_id], now=1_900.0) == [job_id]


async def test_notify_after_archive_holds_the_success_back(store: JobStore) -> None:
    await store.set_archive_mode("notify-after")
    job_id = await _succeeded(store)
    assert await _types(store, job_id) == ["job.created"]
    await store.fail_archive(job_id, "archive: 503", next_at=1_600.0, now=1_501.0)
    assert await _types(store, job_id) == ["job.created"]
    await store.finish_archive(job_id, _files(job_id), now=2_000.0)
    assert await _types(store, job_id) == ["job.created", "job.succeeded", "job.archived"]
    [succeeded] = [e for e in await store.list_events() if e.type == "job.succeeded"]
    assert len(succeeded.job["files"]) == 2  # type: ignore[arg-type]

    other = await _succeeded(store, ("https://cdn.example/c.png",))
    await store.fail_archive(other, "archive: refused", next_at=None, now=1_600.0)
    assert await _types(store, other) == ["job.created", "job.succeeded"]
    [told] = [e for e in await store.list_events() if e.job_id == other and e.type != "job.created"]
    assert told.job["last_error"] == "archive: refused"


async def test_pruned_jobs_leave_their_files_in_the_trash(store: JobStore) -> None:
    await store.set_archive_mode("on")
    job_id = await _succeeded(store)
    await store.finish_archive(job_id, _files(job_id), now=2_000.0)
    assert await store.archive_trash(limit=10) == []
    assert await store.prune_jobs(before=1e12, limit=10) == [job_id]
    assert await store.archive_trash(limit=10) == [(job_id, [f"{job_id}/0.png", f"{job_id}/1.png"])]
    await store.forget_archive_trash([job_id])
    assert await store.archive_trash(limit=10) == []
