"""The JobStore contract, run against every store.

Each backend is one entry in ``STORES``: a function from a :class:`Scratch` (a directory,
and a maker of PostgreSQL databases) to an async context manager that yields an open,
empty store. Tests that only make sense for one backend (files on disk, schema versions,
several instances on one database, lost connections) sit at the end.
"""

from __future__ import annotations

import socket
import sqlite3
import sys
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import psycopg_pool
import pytest
import trio
import trio.testing

from kied.core.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    EndedBy,
    EventKind,
    Job,
    JobId,
    JobState,
    Report,
    TaskId,
    advance,
    is_late,
)
from kied.errors import ConfigError, ConflictError, IllegalTransitionError, StoreUnavailableError
from kied.settings import PostgresStoreSettings, SqliteStoreSettings
from kied.store import (
    CallbackEffect,
    CallbackHistory,
    CallbackRecord,
    DeliveryState,
    Finish,
    InboxEntry,
    JobStore,
    ListeningSpan,
    SqliteStore,
    open_store,
)
from kied.store._migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from kied.store._postgres import PostgresStore, _Attempt, _conninfo, _may_retry
from kied.testing import MemoryStore, make_inbox_entry, make_new_job
from tests.conftest import wait_for
from tests.pg import PgDatabases, PgProxy, PgServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection
    from pathlib import Path

#: No test here needs more than a fraction of this.
TEST_DEADLINE_S = 30.0

E = EventKind
S = JobState


@dataclass
class Scratch:
    """Where a store can start empty: a directory, and PostgreSQL databases."""

    tmp_path: Path
    pg: PgDatabases


@asynccontextmanager
async def _memory_store(scratch: Scratch) -> AsyncIterator[JobStore]:
    store = MemoryStore()
    try:
        yield store
    finally:
        await store.aclose()


def _sqlite_store(scratch: Scratch) -> AbstractAsyncContextManager[JobStore]:
    return open_store(SqliteStoreSettings(path=scratch.tmp_path / "kied.db"))


@asynccontextmanager
async def _postgres_store(scratch: Scratch) -> AsyncIterator[JobStore]:
    url = await trio.to_thread.run_sync(scratch.pg.new)
    async with open_store(PostgresStoreSettings(url=url)) as store:
        yield store


STORES: dict[str, Callable[[Scratch], AbstractAsyncContextManager[JobStore]]] = {
    "memory": _memory_store,
    "sqlite": _sqlite_store,
    "postgres": _postgres_store,
}


@pytest.fixture(autouse=True)
async def _test_deadline(nursery: trio.Nursery) -> None:
    # A failing watchdog task cancels the test, so a hang fails with a clear message.
    async def watchdog() -> None:
        await trio.sleep(TEST_DEADLINE_S)
        raise TimeoutError(f"the test did not finish within {TEST_DEADLINE_S} s")

    nursery.start_soon(watchdog)


@pytest.fixture(params=sorted(STORES))
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_databases: PgDatabases
) -> AsyncIterator[JobStore]:
    async with STORES[request.param](Scratch(tmp_path, pg_databases)) as store:
        yield store


def _report(event: EventKind, *, source: EndedBy | None = None) -> Report:
    """A report as a poller, callback, deadline or the application would make it."""
    if event is E.SUCCEEDED:
        return Report(
            event=event,
            source=source or EndedBy.POLL,
            kie_state="success",
            result_urls=("https://cdn.example/1.png", "https://cdn.example/2.png"),
            result={"resultUrls": ["https://cdn.example/1.png"], "seed": 7, "nsfw": False},
        )
    if event is E.FAILED:
        return Report(
            event=event,
            source=source or EndedBy.POLL,
            kie_state="fail",
            error_code="501",
            error_message="generation failed: ünïcode",
        )
    if event is E.PROGRESS:
        return Report(event=event, source=source or EndedBy.POLL, kie_state="generating")
    if event is E.ACCEPTED:
        return Report(event=event, source=source or EndedBy.SUBMIT, kie_state="waiting")
    if event is E.DEADLINE:
        return Report(event=event, source=source or EndedBy.DEADLINE)
    return Report(event=event, source=source or EndedBy.CANCEL)


#: Events that bring a new (submitting) job into each state.
_PATH_TO: dict[JobState, tuple[EventKind, ...]] = {
    S.SUBMITTING: (),
    S.PENDING: (E.ACCEPTED,),
    S.SUCCEEDED: (E.SUCCEEDED,),
    S.FAILED: (E.FAILED,),
    S.TIMED_OUT: (E.DEADLINE,),
    S.CANCELLED: (E.CANCEL,),
}


async def _job_in(store: JobStore, state: JobState, **new_job: object) -> Job:
    job, created = await store.create_job(make_new_job(**new_job))  # type: ignore[arg-type]
    assert created
    for event in _PATH_TO[state]:
        changed = await store.apply(job.id, _report(event), now=job.created_at + 10)
        assert changed is not None
        job = changed
    assert job.state is state
    return job


# ------------------------------------------------------------------- jobs


async def test_create_and_read_back(store: JobStore) -> None:
    new = make_new_job(
        job_id="job-1",
        family="veo",
        model="veo3_fast",
        request={"prompt": "a cat, ünïcode ✓", "n": 2, "ratio": 1.5, "tags": ["a", None]},
        metadata={"chat_id": 42, "nested": {"deep": [1, {"x": True}]}},
        idempotency_key="key-1",
        created_at=1_000.25,
        timeout_s=900.0,
    )
    job, created = await store.create_job(new)
    assert created
    assert job == Job(
        id=JobId("job-1"),
        family="veo",
        model="veo3_fast",
        task_id=None,
        state=S.SUBMITTING,
        request=new.request,
        metadata=new.metadata,
        idempotency_key="key-1",
        created_at=1_000.25,
        updated_at=1_000.25,
        deadline_at=1_900.25,
    )
    assert await store.get_job(JobId("job-1")) == job
    assert await store.get_job(JobId("no-such-job")) is None
    assert await store.get_job_by_task(TaskId("no-such-task")) is None


async def test_create_with_task_id_starts_pending(store: JobStore) -> None:
    job, created = await store.create_job(make_new_job(task_id="task-1"))
    assert created
    assert job.state is S.PENDING
    assert job.task_id == "task-1"
    assert await store.get_job_by_task(TaskId("task-1")) == job


async def test_stored_job_is_detached_from_the_caller(store: JobStore) -> None:
    request = {"prompt": "x", "list": [1]}
    job, _ = await store.create_job(make_new_job(request=request))  # type: ignore[arg-type]
    request["list"].append(2)  # type: ignore[attr-defined]
    assert job.request is not None
    job.request["prompt"] = "changed"
    stored = await store.get_job(job.id)
    assert stored is not None
    assert stored.request == {"prompt": "x", "list": [1]}


async def test_create_is_idempotent_by_key(store: JobStore) -> None:
    first, created = await store.create_job(make_new_job(idempotency_key="k", created_at=1.0))
    assert created
    again, created = await store.create_job(
        make_new_job(idempotency_key="k", family="other", created_at=2.0)
    )
    assert not created
    assert again == first
    assert await store.list_jobs() == [first]


async def test_create_is_idempotent_by_task_id(store: JobStore) -> None:
    first, created = await store.create_job(make_new_job(task_id="t"))
    assert created
    again, created = await store.create_job(make_new_job(task_id="t", idempotency_key="other"))
    assert not created
    assert again == first
    assert len(await store.list_jobs()) == 1


async def test_create_is_idempotent_by_job_id(store: JobStore) -> None:
    first, _ = await store.create_job(make_new_job(job_id="same"))
    again, created = await store.create_job(make_new_job(job_id="same", family="other"))
    assert not created
    assert again == first


async def test_jobs_without_key_or_task_are_distinct(store: JobStore) -> None:
    await store.create_job(make_new_job())
    await store.create_job(make_new_job())
    assert len(await store.list_jobs()) == 2


# ------------------------------------------------------------------- transitions


@pytest.mark.parametrize("state", list(JobState))
@pytest.mark.parametrize("event", list(EventKind))
async def test_every_transition(store: JobStore, state: JobState, event: EventKind) -> None:
    before = await _job_in(store, state)
    report = _report(event)
    after = await store.apply(before.id, report, now=5_000.0)
    try:
        expected = advance(state, event)
    except IllegalTransitionError:
        assert after is None
        assert await store.get_job(before.id) == before
        return
    assert after is not None
    assert await store.get_job(before.id) == after
    assert after.state is expected
    assert after.updated_at == 5_000.0
    assert after.kie_state == (report.kie_state or before.kie_state)
    assert after.late is is_late(state, event)
    if expected in TERMINAL_STATES:
        assert (after.ended_by, after.ended_at) == (report.source, 5_000.0)
    else:
        assert (after.ended_by, after.ended_at) == (None, None)
    if event is E.SUCCEEDED:
        assert after.result_urls == report.result_urls
        assert after.result == report.result
        assert (after.error_code, after.error_message) == (None, None)
    elif event is E.FAILED:
        assert (after.error_code, after.error_message) == (
            report.error_code,
            report.error_message,
        )
        assert (after.result_urls, after.result) == (before.result_urls, before.result)
    else:
        assert (after.result_urls, after.result) == (before.result_urls, before.result)
        assert (after.error_code, after.error_message) == (
            before.error_code,
            before.error_message,
        )
    # Nothing else moves.
    unchanged = replace(
        after,
        state=before.state,
        updated_at=before.updated_at,
        kie_state=before.kie_state,
        result_urls=before.result_urls,
        result=before.result,
        error_code=before.error_code,
        error_message=before.error_message,
        ended_by=before.ended_by,
        ended_at=before.ended_at,
        late=before.late,
    )
    assert unchanged == before


async def test_progress_on_pending_is_a_change(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING)
    first = await store.apply(job.id, _report(E.PROGRESS), now=2_000.0)
    assert first is not None
    assert (first.state, first.kie_state, first.updated_at) == (S.PENDING, "generating", 2_000.0)
    # A report without KIE's state keeps the one already known.
    second = await store.apply(job.id, Report(event=E.PROGRESS, source=EndedBy.POLL), now=2_001.0)
    assert second is not None
    assert (second.kie_state, second.updated_at) == ("generating", 2_001.0)


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (E.SUCCEEDED, E.FAILED),
        (E.FAILED, E.SUCCEEDED),
        (E.CANCEL, E.SUCCEEDED),
        (E.SUCCEEDED, E.DEADLINE),
        (E.SUCCEEDED, E.CANCEL),
        (E.FAILED, E.PROGRESS),
    ],
)
async def test_terminal_states_are_sticky(
    store: JobStore, first: EventKind, then: EventKind
) -> None:
    job = await _job_in(store, S.PENDING)
    ended = await store.apply(job.id, _report(first), now=2_000.0)
    assert ended is not None
    assert await store.apply(job.id, _report(then), now=2_001.0) is None
    assert await store.get_job(job.id) == ended


@pytest.mark.parametrize("event", [E.SUCCEEDED, E.FAILED, E.DEADLINE, E.CANCEL])
async def test_repeating_a_terminal_write_is_a_no_op(store: JobStore, event: EventKind) -> None:
    job = await _job_in(store, S.PENDING)
    once = await store.apply(job.id, _report(event), now=2_000.0)
    assert once is not None
    assert await store.apply(job.id, _report(event), now=2_001.0) is None
    assert await store.get_job(job.id) == once


async def test_outcome_after_deadline_replaces_timed_out_and_is_late(store: JobStore) -> None:
    job = await _job_in(store, S.TIMED_OUT)
    assert not job.late
    report = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    late = await store.apply(job.id, report, now=3_000.0)
    assert late is not None
    assert (late.state, late.late, late.ended_by, late.ended_at) == (
        S.SUCCEEDED,
        True,
        EndedBy.CALLBACK,
        3_000.0,
    )
    assert late.result_urls == report.result_urls


async def test_failure_after_deadline_is_late_and_cancel_is_not(store: JobStore) -> None:
    failed = await store.apply(
        (await _job_in(store, S.TIMED_OUT)).id, _report(E.FAILED), now=3_000.0
    )
    assert failed is not None
    assert (failed.state, failed.late, failed.error_code) == (S.FAILED, True, "501")
    cancelled = await store.apply(
        (await _job_in(store, S.TIMED_OUT)).id, _report(E.CANCEL), now=3_000.0
    )
    assert cancelled is not None
    assert (cancelled.state, cancelled.late) == (S.CANCELLED, False)


async def test_apply_to_unknown_job_is_a_no_op(store: JobStore) -> None:
    assert await store.apply(JobId("nope"), _report(E.SUCCEEDED), now=1.0) is None


async def test_concurrent_applies_have_exactly_one_winner(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING)
    results: list[Job | None] = []

    async def write(i: int) -> None:
        # Each of these ends the job for good (timed_out could still be replaced).
        event = (E.SUCCEEDED, E.FAILED, E.CANCEL)[i % 3]
        results.append(await store.apply(job.id, _report(event), now=2_000.0 + i))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(write, i)
    winners = [r for r in results if r is not None]
    assert len(results) == 40
    assert len(winners) == 1
    assert await store.get_job(job.id) == winners[0]


# ------------------------------------------------------------------- attach_task, note_error


async def test_attach_task_moves_submitting_to_pending(store: JobStore) -> None:
    job = await _job_in(store, S.SUBMITTING)
    attachment = await store.attach_task(job.id, TaskId("t-1"), now=1_005.0)
    assert attachment is not None
    attached = attachment.job
    assert (attached.state, attached.task_id, attached.updated_at) == (S.PENDING, "t-1", 1_005.0)
    assert not attachment.ended
    assert await store.get_job_by_task(TaskId("t-1")) == attached
    again = await store.attach_task(job.id, TaskId("t-1"), now=1_006.0)
    assert again is not None
    assert (again.job.state, again.job.task_id, again.ended) == (S.PENDING, "t-1", False)


async def test_attach_task_to_unknown_job(store: JobStore) -> None:
    assert await store.attach_task(JobId("nope"), TaskId("t"), now=1.0) is None
    assert await store.get_job_by_task(TaskId("t")) is None


async def test_attach_task_records_the_task_of_an_ended_job(store: JobStore) -> None:
    job = await _job_in(store, S.CANCELLED)
    attached = await store.attach_task(job.id, TaskId("t-late"), now=1_100.0)
    assert attached is not None
    assert (attached.job.state, attached.job.task_id, attached.ended) == (
        S.CANCELLED,
        "t-late",
        False,
    )


async def test_attach_task_conflicts(store: JobStore) -> None:
    one = await _job_in(store, S.SUBMITTING)
    two = await _job_in(store, S.SUBMITTING)
    assert await store.attach_task(one.id, TaskId("t-1"), now=1_001.0) is not None
    with pytest.raises(ConflictError):
        await store.attach_task(two.id, TaskId("t-1"), now=1_002.0)
    after_one = await store.get_job(one.id)
    after_two = await store.get_job(two.id)
    assert after_one is not None
    assert after_two is not None
    assert (after_one.task_id, after_two.task_id, after_two.state) == ("t-1", None, S.SUBMITTING)


async def test_a_late_create_answer_is_kept_beside_the_task_the_job_follows(
    store: JobStore,
) -> None:
    job = await _job_in(store, S.SUBMITTING)
    assert await store.attach_task(job.id, TaskId("t-1"), now=1_001.0) is not None
    late = await store.attach_task(job.id, TaskId("t-late"), now=1_002.0)
    assert late is not None
    assert (late.job.task_id, late.job.state, late.job.other_task_ids, late.ended) == (
        "t-1",
        S.PENDING,
        ("t-late",),
        False,
    )
    again = await store.attach_task(job.id, TaskId("t-late"), now=1_003.0)
    assert again is not None
    assert again.job.other_task_ids == ("t-late",)
    # the late task is no one's: a job may still be created to track it
    tracked, created = await store.create_job(make_new_job(task_id="t-late"))
    assert created
    assert tracked.task_id == "t-late"


async def test_note_error(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING)
    await store.note_error(job.id, "KIE answered 502", now=1_500.0)
    await store.note_error(job.id, "KIE answered 429", now=1_600.0)
    noted = await store.get_job(job.id)
    assert noted is not None
    assert (noted.last_error, noted.updated_at, noted.state) == (
        "KIE answered 429",
        1_600.0,
        S.PENDING,
    )
    await store.note_error(JobId("nope"), "ignored", now=1.0)


# ------------------------------------------------------------------- listing


async def test_unfinished_jobs_oldest_deadline_first(store: JobStore) -> None:
    late_deadline = await _job_in(store, S.PENDING, created_at=100.0, timeout_s=900.0)
    early = await _job_in(store, S.SUBMITTING, created_at=200.0, timeout_s=100.0)
    middle = await _job_in(store, S.PENDING, created_at=300.0, timeout_s=400.0)
    for state in TERMINAL_STATES:
        await _job_in(store, state, created_at=0.0, timeout_s=1.0)
    unfinished = await store.unfinished_jobs()
    assert [j.id for j in unfinished] == [early.id, middle.id, late_deadline.id]
    assert all(j.state in ACTIVE_STATES for j in unfinished)


async def test_list_jobs_newest_first_with_states_and_limit(store: JobStore) -> None:
    a = await _job_in(store, S.PENDING, created_at=1.0)
    b = await _job_in(store, S.SUCCEEDED, created_at=3.0)
    c = await _job_in(store, S.SUBMITTING, created_at=2.0)
    d = await _job_in(store, S.FAILED, created_at=3.0)  # same time as b, stored later
    assert [j.id for j in await store.list_jobs()] == [d.id, b.id, c.id, a.id]
    assert [j.id for j in await store.list_jobs(limit=2)] == [d.id, b.id]
    assert await store.list_jobs(limit=0) == []
    active = await store.list_jobs(states=[S.PENDING, S.SUBMITTING])
    assert [j.id for j in active] == [c.id, a.id]
    assert [j.id for j in await store.list_jobs(states={"succeeded"})] == [b.id]
    assert await store.list_jobs(states=[]) == []


# ------------------------------------------------------------------- callbacks


async def test_callback_changes_its_job(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING, task_id="t-1")
    entry = make_inbox_entry(task_id="t-1", received_at=1_200.0, body=b'{"code":200}')
    report = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    record = await store.record_callback(entry, report)
    assert record.effect is CallbackEffect.CHANGED
    assert record.job is not None
    assert (record.job.id, record.job.state, record.job.ended_by) == (
        job.id,
        S.SUCCEEDED,
        EndedBy.CALLBACK,
    )
    assert (record.job.ended_at, record.job.updated_at) == (1_200.0, 1_200.0)
    assert await store.get_job(job.id) == record.job
    [stored] = await store.list_callbacks()
    assert stored.id == record.inbox_id
    assert stored.entry == entry
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.CHANGED, job.id)


async def test_repeated_callback_is_a_no_op(store: JobStore) -> None:
    await _job_in(store, S.PENDING, task_id="t-1")
    entry = make_inbox_entry(task_id="t-1", received_at=1_200.0)
    report = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    first = await store.record_callback(entry, report)
    second = await store.record_callback(replace(entry, received_at=1_201.0), report)
    assert first.effect is CallbackEffect.CHANGED
    assert second.effect is CallbackEffect.NO_OP
    assert second.job == first.job
    assert second.inbox_id != first.inbox_id
    stored = await store.list_callbacks(task_id=TaskId("t-1"))
    assert [c.effect for c in stored] == [CallbackEffect.NO_OP, CallbackEffect.CHANGED]


async def test_callback_headers_and_hash_read_back(store: JobStore) -> None:
    entry = replace(
        make_inbox_entry(task_id="t-1", authenticated=False),
        headers={"content-type": "application/json", "authorization": "***"},
        body_sha256="ab" * 32,
        journal_id="jnl_1",
    )
    await store.record_callback(entry, None)
    [stored] = await store.list_callbacks()
    assert stored.entry == entry


async def test_a_journal_entry_is_stored_and_applied_once(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING, task_id="t-1")
    entry = replace(make_inbox_entry(task_id="t-1", received_at=1_200.0), journal_id="jnl_1")
    report = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    first = await store.record_callback(entry, report)
    again = await store.record_callback(replace(entry, received_at=1_300.0), report)
    assert first.effect is CallbackEffect.CHANGED
    assert (again.inbox_id, again.effect) == (first.inbox_id, CallbackEffect.CHANGED)
    assert again.job is not None
    assert (again.job.id, again.job.state) == (job.id, S.SUCCEEDED)
    assert [c.id for c in await store.list_callbacks()] == [first.inbox_id]
    events = [e.type for e in await store.list_events() if e.job_id == job.id]
    assert events.count("job.succeeded") == 1
    other = await store.record_callback(replace(entry, journal_id="jnl_2"), report)
    assert other.inbox_id != first.inbox_id


async def test_callback_for_no_known_job(store: JobStore) -> None:
    record = await store.record_callback(
        make_inbox_entry(task_id="t-unknown"), _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    )
    assert (record.effect, record.job) == (CallbackEffect.NO_JOB, None)
    [stored] = await store.list_callbacks()
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.NO_JOB, None)


async def test_unauthenticated_callback_changes_nothing(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING, task_id="t-1")
    entry = make_inbox_entry(task_id="t-1", job_id=job.id, authenticated=False)
    record = await store.record_callback(entry, _report(E.SUCCEEDED, source=EndedBy.CALLBACK))
    assert (record.effect, record.job) == (CallbackEffect.REJECTED, None)
    assert await store.get_job(job.id) == job
    [stored] = await store.list_callbacks()
    assert stored.entry == entry
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.REJECTED, None)


async def test_callback_without_outcome_is_not_applicable(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING, task_id="t-1")
    entry = make_inbox_entry(task_id="t-1", outcome="unknown", problem="invalid JSON")
    record = await store.record_callback(entry, None)
    assert (record.effect, record.job) == (CallbackEffect.NOT_APPLICABLE, job)
    assert await store.get_job(job.id) == job
    orphan = await store.record_callback(make_inbox_entry(task_id="t-x", outcome="unknown"), None)
    assert (orphan.effect, orphan.job) == (CallbackEffect.NOT_APPLICABLE, None)


async def test_a_callback_changes_only_the_job_that_follows_its_task(store: JobStore) -> None:
    one = await _job_in(store, S.PENDING, task_id="t-1")
    two = await _job_in(store, S.PENDING, task_id="t-2")
    report = _report(E.FAILED, source=EndedBy.CALLBACK)
    # The URL names job one, the body task t-2: t-2 is what KIE vouches for.
    record = await store.record_callback(make_inbox_entry(task_id="t-2", job_id=one.id), report)
    assert record.job is not None
    assert (record.effect, record.job.id, record.job.state) == (
        CallbackEffect.CHANGED,
        two.id,
        S.FAILED,
    )
    assert await store.get_job(one.id) == one
    # An unknown job id: the task id finds the job.
    record = await store.record_callback(make_inbox_entry(task_id="t-1", job_id="nope"), report)
    assert record.job is not None
    assert (record.effect, record.job.id, record.job.state) == (
        CallbackEffect.CHANGED,
        one.id,
        S.FAILED,
    )


async def test_a_callback_from_another_task_never_changes_the_job(store: JobStore) -> None:
    job = await _job_in(store, S.PENDING, task_id="t-mine")
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    # The orphan of a createTask whose answer was lost names the job in its URL.
    entry = make_inbox_entry(task_id="t-orphan", job_id=job.id, received_at=1_100.0)
    record = await store.record_callback(entry, success)
    assert record.job is not None
    assert (record.effect, record.adopted, record.job.state, record.job.result_urls) == (
        CallbackEffect.OTHER_TASK,
        False,
        S.PENDING,
        (),
    )
    assert record.job.other_task_ids == ("t-orphan",)
    # A callback that names no task cannot show it is the job's.
    entry = make_inbox_entry(task_id=None, job_id=job.id, received_at=1_200.0)
    record = await store.record_callback(entry, success)
    assert record.effect is CallbackEffect.OTHER_TASK
    after = await store.get_job(job.id)
    assert after is not None
    assert (after.state, after.task_id, after.other_task_ids) == (
        S.PENDING,
        "t-mine",
        ("t-orphan",),
    )
    rows = await store.list_callbacks(limit=2)
    assert [(r.effect, r.matched_job_id) for r in rows] == [
        (CallbackEffect.OTHER_TASK, job.id),
        (CallbackEffect.OTHER_TASK, job.id),
    ]
    # The job's own task still ends it.
    entry = make_inbox_entry(task_id="t-mine", job_id=job.id, received_at=1_300.0)
    record = await store.record_callback(entry, success)
    assert (record.effect, record.job.state if record.job else None) == (
        CallbackEffect.CHANGED,
        S.SUCCEEDED,
    )


async def test_a_job_waiting_for_createtask_adopts_the_task_its_callback_names(
    store: JobStore,
) -> None:
    job = await _job_in(store, S.SUBMITTING)
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    entry = make_inbox_entry(task_id="t-a", job_id=job.id, received_at=1_100.0)
    record = await store.record_callback(entry, success)
    assert record.job is not None
    assert (record.effect, record.adopted, record.job.task_id, record.job.state) == (
        CallbackEffect.CHANGED,
        True,
        "t-a",
        S.SUCCEEDED,
    )
    # A second task's callback for the same job (it was created twice) changes nothing.
    entry = make_inbox_entry(task_id="t-b", job_id=job.id, outcome="fail", received_at=1_200.0)
    record = await store.record_callback(entry, _report(E.FAILED, source=EndedBy.CALLBACK))
    assert record.job is not None
    assert (record.effect, record.job.state, record.job.other_task_ids) == (
        CallbackEffect.OTHER_TASK,
        S.SUCCEEDED,
        ("t-b",),
    )
    # createTask answering the second task afterwards leaves the job on its one task.
    late = await store.attach_task(job.id, TaskId("t-b"), now=1_300.0)
    assert late is not None
    assert (late.job.task_id, late.job.state, late.job.result_urls, late.ended) == (
        "t-a",
        S.SUCCEEDED,
        success.result_urls,
        False,
    )


async def test_a_job_cannot_adopt_a_task_another_job_follows(store: JobStore) -> None:
    waiting = await _job_in(store, S.SUBMITTING)
    other = await _job_in(store, S.PENDING, task_id="t-taken")
    entry = make_inbox_entry(task_id="t-new", job_id=waiting.id)
    # sanity: a fresh task is adopted ...
    fresh = await store.record_callback(entry, _report(E.PROGRESS, source=EndedBy.CALLBACK))
    assert fresh.adopted
    second = await _job_in(store, S.SUBMITTING)
    entry = make_inbox_entry(task_id="t-taken", job_id=second.id)
    record = await store.record_callback(entry, _report(E.FAILED, source=EndedBy.CALLBACK))
    # ... but t-taken is other's: the callback is other's (found by its task first)
    assert record.job is not None
    assert (record.effect, record.job.id, record.job.state) == (
        CallbackEffect.CHANGED,
        other.id,
        S.FAILED,
    )
    after = await store.get_job(second.id)
    assert after is not None
    assert (after.task_id, after.state) == (None, S.SUBMITTING)


# ------------------------------------------------------------------- KIE's signature alone


def _signed_only(task_id: str | None, **kw: Any) -> InboxEntry:
    """A callback authenticated by KIE's signature alone: its body is a hint."""
    return replace(make_inbox_entry(task_id=task_id, **kw), auth="hmac")


async def test_a_signed_only_callback_asks_to_confirm_instead_of_applying(
    store: JobStore,
) -> None:
    job = await _job_in(store, S.PENDING, task_id="t-1")
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    record = await store.record_callback(_signed_only("t-1", received_at=1_200.0), success)
    assert record.effect is CallbackEffect.CONFIRMING
    expected = replace(job, confirm_requested_at=1_200.0)
    assert record.job == expected
    assert await store.get_job(job.id) == expected
    # a newer request replaces an older one; an older one changes nothing
    await store.record_callback(_signed_only("t-1", received_at=1_300.0), success)
    await store.record_callback(_signed_only("t-1", received_at=1_250.0), success)
    after = await store.get_job(job.id)
    assert after == replace(job, confirm_requested_at=1_300.0)
    assert [j.confirm_requested_at for j in await store.unfinished_jobs()] == [1_300.0]
    rows = await store.list_callbacks(task_id=TaskId("t-1"))
    assert [(r.effect, r.matched_job_id) for r in rows] == [(CallbackEffect.CONFIRMING, job.id)] * 3
    # the poller's answer ends the job; then there is nothing left to confirm
    ended = await store.apply(job.id, _report(E.FAILED), now=1_400.0)
    assert ended is not None
    late = await store.record_callback(_signed_only("t-1", received_at=1_500.0), success)
    assert (late.effect, late.job) == (CallbackEffect.NO_OP, ended)


async def test_a_signed_only_callback_for_a_timed_out_job_asks_to_confirm(
    store: JobStore,
) -> None:
    job = await _job_in(store, S.TIMED_OUT, task_id="t-1")
    record = await store.record_callback(
        _signed_only("t-1", received_at=1_200.0), _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    )
    assert record.effect is CallbackEffect.CONFIRMING
    assert record.job == replace(job, confirm_requested_at=1_200.0)


async def test_a_job_waiting_for_createtask_adopts_a_signed_only_callbacks_task_unconfirmed(
    store: JobStore,
) -> None:
    job = await _job_in(store, S.SUBMITTING)
    entry = _signed_only("t-a", job_id=job.id, received_at=1_100.0)
    record = await store.record_callback(entry, _report(E.SUCCEEDED, source=EndedBy.CALLBACK))
    assert record.job is not None
    assert (record.effect, record.adopted) == (CallbackEffect.CONFIRMING, True)
    assert (record.job.task_id, record.job.state, record.job.confirm_requested_at) == (
        "t-a",
        S.SUBMITTING,
        1_100.0,
    )
    assert record.job.result_urls == ()
    assert await store.get_job(job.id) == record.job
    assert await _types(store, job.id) == ["job.created", "job.submitted"]


async def test_an_early_signed_only_callback_asks_to_confirm_once_its_job_has_the_task(
    store: JobStore,
) -> None:
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    early = await store.record_callback(_signed_only("t-early", received_at=1_050.0), success)
    assert early.effect is CallbackEffect.NO_JOB
    created, _ = await store.create_job(make_new_job(task_id="t-early", created_at=1_100.0))
    assert (created.state, created.confirm_requested_at, created.result_urls) == (
        S.PENDING,
        1_100.0,
        (),
    )
    [stored] = await store.list_callbacks(task_id=TaskId("t-early"))
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.CONFIRMING, created.id)

    waiting = await _job_in(store, S.SUBMITTING)
    await store.record_callback(_signed_only("t-two", received_at=1_150.0), success)
    attachment = await store.attach_task(waiting.id, TaskId("t-two"), now=1_160.0)
    assert attachment is not None
    assert not attachment.ended
    assert (attachment.job.state, attachment.job.confirm_requested_at) == (S.PENDING, 1_160.0)
    [stored] = await store.list_callbacks(task_id=TaskId("t-two"))
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.CONFIRMING, waiting.id)


async def test_a_signed_only_callback_never_reaches_a_job_that_follows_another_task(
    store: JobStore,
) -> None:
    mine = await _job_in(store, S.PENDING, task_id="t-mine")
    waiting = await _job_in(store, S.SUBMITTING)
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    record = await store.record_callback(_signed_only("t-other", job_id=mine.id), success)
    assert record.effect is CallbackEffect.OTHER_TASK
    assert await store.get_job(mine.id) == replace(
        mine, other_task_ids=("t-other",), updated_at=1_000.0
    )
    # a callback naming no task changes no job, not even one waiting for its task
    for entry in (make_inbox_entry(task_id=None, job_id=waiting.id), _signed_only(None)):
        record = await store.record_callback(replace(entry, job_id=waiting.id), success)
        assert record.effect is CallbackEffect.OTHER_TASK
    assert await store.get_job(waiting.id) == waiting


async def test_a_signature_is_remembered_once(store: JobStore) -> None:
    assert await store.remember_signature("d1", seen_at=1_000.0)
    assert not await store.remember_signature("d1", seen_at=1_001.0)
    assert await store.remember_signature("d2", seen_at=1_002.0)
    # results of concurrent tries: exactly one is new
    results: list[bool] = []

    async def attempt() -> None:
        results.append(await store.remember_signature("d3", seen_at=1_003.0))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(attempt)
    assert sorted(results) == [False, False, False, False, True]


async def test_listening_spans_are_kept_per_instance_and_old_ones_deleted(
    store: JobStore,
) -> None:
    assert await store.listening_spans(after=0.0) == []
    await store.heard_listening("a", since=1_000.0, now=1_010.0)
    await store.heard_listening("b", since=900.0, now=950.0)
    await store.heard_listening("a", since=1_000.0, now=1_020.5)  # replaces a's span
    await store.heard_listening("c", since=1_030.0, now=1_030.0)
    assert await store.listening_spans(after=0.0) == [
        ListeningSpan(instance="b", since=900.0, until=950.0),
        ListeningSpan(instance="a", since=1_000.0, until=1_020.5),
        ListeningSpan(instance="c", since=1_030.0, until=1_030.0),
    ]
    # those that ended before `after` are left out, and deleted
    assert [s.instance for s in await store.listening_spans(after=1_020.5)] == ["c"]
    assert [s.instance for s in await store.listening_spans(after=0.0)] == ["c"]
    # times survive exactly
    await store.heard_listening("d", since=1_767_225_600.123456, now=1_767_225_601.654321)
    spans = await store.listening_spans(after=1_767_225_600.0)
    assert spans == [
        ListeningSpan(instance="d", since=1_767_225_600.123456, until=1_767_225_601.654321)
    ]
    # other state rows are not taken for spans
    await store.enqueue_deliveries([], cursor=7)
    assert await store.webhook_cursor() == 7
    assert len(await store.listening_spans(after=0.0)) == 1


async def test_callback_history_is_the_newest_callback_and_finishes(store: JobStore) -> None:
    empty = await store.callback_history(limit=10)
    assert empty == CallbackHistory(last_callback_at=None, finishes=())
    ends = [
        ("j1", "m1", EndedBy.CALLBACK, 1_010.0),
        ("j2", "m2", EndedBy.POLL, 1_030.0),
        ("j3", None, EndedBy.CALLBACK_CONFIRMED, 1_020.0),
        ("j4", "m1", EndedBy.DEADLINE, 1_040.0),  # neither callback nor poll: left out
        ("j5", "m1", EndedBy.CANCEL, 1_050.0),
    ]
    for job_id, model, by, at in ends:
        job, _ = await store.create_job(
            make_new_job(job_id=job_id, model=model, task_id=f"t-{job_id}", created_at=1_000.0)
        )
        event = {
            EndedBy.DEADLINE: E.DEADLINE,
            EndedBy.CANCEL: E.CANCEL,
        }.get(by, E.SUCCEEDED)
        assert await store.apply(job.id, _report(event, source=by), now=at) is not None
    await store.create_job(make_new_job(job_id="j6", created_at=1_000.0))  # unfinished
    for at, authenticated in ((1_005.0, True), (1_025.0, True), (1_060.0, False)):
        entry = make_inbox_entry(task_id="t-none", authenticated=authenticated, received_at=at)
        await store.record_callback(entry, None)
    history = await store.callback_history(limit=10)
    assert history.last_callback_at == 1_025.0  # the unauthenticated one does not count
    assert history.finishes == (
        Finish(family="market", model="m1", by="callback", created_at=1_000.0, ended_at=1_010.0),
        Finish(family="market", model=None, by="callback", created_at=1_000.0, ended_at=1_020.0),
        Finish(family="market", model="m2", by="poll", created_at=1_000.0, ended_at=1_030.0),
    )
    newest = await store.callback_history(limit=2)
    assert [f.ended_at for f in newest.finishes] == [1_020.0, 1_030.0]
    assert (await store.callback_history(limit=0)).finishes == ()
    with pytest.raises(ValueError, match="limit"):
        await store.callback_history(limit=-1)


async def test_old_signatures_are_pruned_in_batches(store: JobStore) -> None:
    for i in range(5):
        assert await store.remember_signature(f"d{i}", seen_at=1_000.0 + i)
    assert await store.prune_signatures(before=1_003.0, limit=2) == 2
    assert await store.prune_signatures(before=1_003.0, limit=2) == 1
    assert await store.prune_signatures(before=1_003.0, limit=2) == 0
    # the pruned are forgotten, the others still known
    assert await store.remember_signature("d0", seen_at=1_010.0)
    assert not await store.remember_signature("d3", seen_at=1_010.0)
    assert not await store.remember_signature("d4", seen_at=1_010.0)
    with pytest.raises(ValueError, match="limit"):
        await store.prune_signatures(before=0.0, limit=-1)


async def test_one_submission_at_a_time(store: JobStore) -> None:
    job = await _job_in(store, S.SUBMITTING)
    assert (job.submit_count, job.submit_sent_at, job.submission_in_flight) == (0, None, False)
    url = "https://kied.test/callbacks/kie?job=x&token=%2A%2A%2A"
    first = await store.begin_submission(job.id, count=0, callback_url=url, now=1_010.0)
    assert first is not None
    assert (first.submit_count, first.submit_sent_at, first.submit_callback_url) == (
        1,
        1_010.0,
        url,
    )
    assert first.submission_in_flight
    # A second leader that read the job before the first began loses the compare-and-set.
    assert await store.begin_submission(job.id, count=0, callback_url=url, now=1_011.0) is None
    # KIE answered "busy": not in flight any more, and the next one may begin.
    await store.end_submission(job.id, count=1, now=1_012.0)
    ended = await store.get_job(job.id)
    assert ended is not None
    assert (ended.submit_count, ended.submit_sent_at, ended.submission_in_flight) == (
        1,
        None,
        False,
    )
    assert await store.begin_submission(job.id, count=1, callback_url=url, now=1_013.0) is not None
    # A stale end (of submission 1) does not clear submission 2.
    await store.end_submission(job.id, count=1, now=1_014.0)
    again = await store.get_job(job.id)
    assert again is not None
    assert (again.submit_count, again.submission_in_flight) == (2, True)
    attached = await store.attach_task(job.id, TaskId("t-1"), now=1_015.0)
    assert attached is not None
    assert (attached.job.submission_in_flight, attached.job.submit_count) == (False, 2)
    # Nothing is sent for a job that has its task, or has ended.
    assert await store.begin_submission(job.id, count=2, callback_url=url, now=1_016.0) is None
    cancelled = await _job_in(store, S.CANCELLED)
    assert await store.begin_submission(cancelled.id, count=0, callback_url=url, now=1.0) is None


async def test_the_first_submission_moves_the_deadline_by_the_wait_in_the_queue(
    store: JobStore,
) -> None:
    # Created at 1000 with a 900-s timeout; kied's createTask queue held it 250 s.
    job, _ = await store.create_job(make_new_job(created_at=1_000.0, timeout_s=900.0))
    assert job.deadline_at == 1_900.0
    url = "https://kied.test/callbacks/kie?job=x&token=%2A%2A%2A"
    first = await store.begin_submission(job.id, count=0, callback_url=url, now=1_250.0)
    assert first is not None
    assert first.deadline_at == 2_150.0  # the timeout counts from the createTask
    stored = await store.get_job(job.id)
    assert stored is not None
    assert stored.deadline_at == 2_150.0  # stored: a restart keeps it
    # KIE answered "busy": the next createTask is KIE's delay, counted in the timeout.
    await store.end_submission(job.id, count=1, now=1_251.0)
    second = await store.begin_submission(job.id, count=1, callback_url=url, now=1_300.0)
    assert second is not None
    assert second.deadline_at == 2_150.0
    # A clock behind created_at (another instance's) never brings the deadline forward.
    early, _ = await store.create_job(make_new_job(created_at=1_000.0, timeout_s=900.0))
    sent = await store.begin_submission(early.id, count=0, callback_url=url, now=990.0)
    assert sent is not None
    assert sent.deadline_at == 1_900.0


async def test_callback_attaches_the_task_id_to_its_job(store: JobStore) -> None:
    job = await _job_in(store, S.SUBMITTING)
    entry = make_inbox_entry(task_id="t-9", job_id=job.id, outcome="pending", received_at=1_050.0)
    record = await store.record_callback(entry, _report(E.PROGRESS, source=EndedBy.CALLBACK))
    assert record.job is not None
    assert (record.effect, record.job.state, record.job.task_id, record.job.kie_state) == (
        CallbackEffect.CHANGED,
        S.PENDING,
        "t-9",
        "generating",
    )
    assert await store.get_job_by_task(TaskId("t-9")) == record.job


async def test_callback_before_its_job_is_applied_on_create(store: JobStore) -> None:
    report = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    early = await store.record_callback(
        make_inbox_entry(task_id="t-early", received_at=1_050.0), report
    )
    assert early.effect is CallbackEffect.NO_JOB
    job, created = await store.create_job(make_new_job(task_id="t-early", created_at=1_100.0))
    assert created
    assert (job.state, job.ended_by, job.ended_at, job.late) == (
        S.SUCCEEDED,
        EndedBy.CALLBACK,
        1_100.0,
        False,
    )
    assert (job.result_urls, job.result, job.kie_state) == (
        report.result_urls,
        report.result,
        "success",
    )
    assert await store.get_job(job.id) == job
    [stored] = await store.list_callbacks(task_id=TaskId("t-early"))
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.CHANGED, job.id)


async def test_callback_before_its_task_is_attached_is_applied(store: JobStore) -> None:
    job = await _job_in(store, S.SUBMITTING)
    report = _report(E.FAILED, source=EndedBy.CALLBACK)
    early = await store.record_callback(
        make_inbox_entry(task_id="t-early", outcome="fail", received_at=1_050.0), report
    )
    assert early.effect is CallbackEffect.NO_JOB
    attachment = await store.attach_task(job.id, TaskId("t-early"), now=1_060.0)
    assert attachment is not None
    assert attachment.ended
    attached = attachment.job
    assert (attached.state, attached.task_id, attached.ended_by) == (
        S.FAILED,
        "t-early",
        EndedBy.CALLBACK,
    )
    assert (attached.error_code, attached.error_message) == (
        report.error_code,
        report.error_message,
    )
    [stored] = await store.list_callbacks()
    assert (stored.effect, stored.matched_job_id) == (CallbackEffect.CHANGED, job.id)


async def test_only_the_newest_early_outcome_is_applied(store: JobStore) -> None:
    fail = _report(E.FAILED, source=EndedBy.CALLBACK)
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    progress = _report(E.PROGRESS, source=EndedBy.CALLBACK)
    await store.record_callback(make_inbox_entry(task_id="t", outcome="fail"), fail)
    await store.record_callback(make_inbox_entry(task_id="t", outcome="success"), success)
    await store.record_callback(make_inbox_entry(task_id="t", outcome="pending"), progress)
    job, _ = await store.create_job(make_new_job(task_id="t"))
    assert job.state is S.SUCCEEDED
    effects = [c.effect for c in await store.list_callbacks(task_id=TaskId("t"))]
    assert effects == [CallbackEffect.NO_JOB, CallbackEffect.CHANGED, CallbackEffect.NO_JOB]


async def test_early_progress_or_rejected_callbacks_are_not_applied(store: JobStore) -> None:
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    progress = _report(E.PROGRESS, source=EndedBy.CALLBACK)
    await store.record_callback(make_inbox_entry(task_id="t", authenticated=False), success)
    await store.record_callback(make_inbox_entry(task_id="t", outcome="pending"), progress)
    job, _ = await store.create_job(make_new_job(task_id="t"))
    assert (job.state, job.kie_state) == (S.PENDING, None)


async def test_list_callbacks_newest_first_with_task_and_limit(store: JobStore) -> None:
    report = _report(E.PROGRESS, source=EndedBy.CALLBACK)
    ids = []
    for i, task in enumerate(["a", "b", "a", "c", "a"]):
        entry = make_inbox_entry(task_id=task, outcome="pending", received_at=1_000.0 + i)
        ids.append((await store.record_callback(entry, report)).inbox_id)
    assert [c.id for c in await store.list_callbacks()] == ids[::-1]
    assert [c.id for c in await store.list_callbacks(limit=2)] == ids[:2:-1]
    assert [c.id for c in await store.list_callbacks(task_id=TaskId("a"))] == [
        ids[4],
        ids[2],
        ids[0],
    ]
    assert [c.id for c in await store.list_callbacks(task_id=TaskId("a"), limit=1)] == [ids[4]]
    assert await store.list_callbacks(task_id=TaskId("zzz")) == []


async def test_callback_entry_round_trips(store: JobStore) -> None:
    entry = replace(
        make_inbox_entry(task_id="t", job_id="j", outcome="unknown", problem="oversized"),
        body=bytes(range(256)),
        body_size=10_000_000,
        content_type=None,
        remote=None,
        found_by="data.task_id",
        auth="token+hmac",
    )
    await store.record_callback(entry, None)
    [stored] = await store.list_callbacks()
    assert stored.entry == entry


async def test_callback_that_cannot_be_stored_changes_nothing(store: JobStore) -> None:
    job = await _job_in(store, S.SUBMITTING)
    report = Report(event=E.SUCCEEDED, source=EndedBy.CALLBACK, result={"x": object()})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        await store.record_callback(make_inbox_entry(task_id="t", job_id=job.id), report)
    assert await store.get_job(job.id) == job
    assert await store.list_callbacks() == []


# ------------------------------------------------------------------- lifecycle


async def test_ping_and_close(store: JobStore) -> None:
    await store.ping()
    job = await _job_in(store, S.PENDING)
    await store.aclose()
    await store.aclose()  # idempotent
    calls: list[Callable[[], Awaitable[object]]] = [
        store.ping,
        lambda: store.create_job(make_new_job()),
        lambda: store.get_job(job.id),
        lambda: store.get_job_by_task(TaskId("t")),
        store.list_jobs,
        store.unfinished_jobs,
        lambda: store.attach_task(job.id, TaskId("t"), now=1.0),
        lambda: store.apply(job.id, _report(E.SUCCEEDED), now=1.0),
        lambda: store.note_error(job.id, "x", now=1.0),
        lambda: store.record_callback(make_inbox_entry(), None),
        store.list_callbacks,
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            await call()


# ------------------------------------------------------------------- SQLite only


async def test_sqlite_data_survives_reopen(tmp_path: Path) -> None:
    settings = SqliteStoreSettings(path=tmp_path / "kied.db")
    async with open_store(settings) as store:
        job = await _job_in(store, S.SUCCEEDED, task_id="t-1", metadata={"chat": 1})
        entry = make_inbox_entry(task_id="t-1")
        await store.record_callback(entry, _report(E.SUCCEEDED, source=EndedBy.CALLBACK))
    with pytest.raises(StoreUnavailableError):
        await store.ping()
    async with open_store(settings) as store:
        assert await store.get_job(job.id) == job
        [stored] = await store.list_callbacks()
        assert (stored.entry, stored.effect) == (entry, CallbackEffect.NO_OP)


async def test_sqlite_creates_its_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deeper" / "kied.db"
    async with open_store(SqliteStoreSettings(path=path)) as store:
        await store.ping()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()


async def test_sqlite_migrations_run_once(tmp_path: Path) -> None:
    path = tmp_path / "kied.db"
    for _ in range(3):
        async with open_store(SqliteStoreSettings(path=path)) as store:
            await store.create_job(make_new_job())
    conn = sqlite3.connect(path)
    try:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version")]
        (jobs,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
    finally:
        conn.close()
    assert versions == list(range(1, len(SQLITE_MIGRATIONS) + 1))
    assert jobs == 3


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "kied.db"
    async with open_store(SqliteStoreSettings(path=path)):
        pass
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, 0)",
                (len(SQLITE_MIGRATIONS) + 1,),
            )
    finally:
        conn.close()
    with pytest.raises(StoreUnavailableError, match="newer"):
        async with open_store(SqliteStoreSettings(path=path)):
            pass


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "kied.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailableError) as info:
        await SqliteStore.connect(path)
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_sqlite_two_connections_have_exactly_one_winner(tmp_path: Path) -> None:
    # Two stores on one file stand for two processes during a deploy.
    settings = SqliteStoreSettings(path=tmp_path / "kied.db")
    async with open_store(settings) as one, open_store(settings) as two:
        job = await _job_in(one, S.PENDING)
        results: list[Job | None] = []

        async def write(store: JobStore, event: EventKind) -> None:
            for _ in range(5):
                results.append(await store.apply(job.id, _report(event), now=2_000.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, one, E.SUCCEEDED)
            nursery.start_soon(write, two, E.FAILED)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert await two.get_job(job.id) == winners[0]


# ------------------------------------------------------------------- SQLite and PostgreSQL
# The database stores share their shape: one thread hop per operation, and callbacks
# queued behind a write are written together.

DATABASE_STORES = ["postgres", "sqlite"]


@asynccontextmanager
async def _database_store(
    kind: str, scratch: Scratch
) -> AsyncIterator[SqliteStore | PostgresStore]:
    """A store whose every write waits while the test holds ``store._limiter``."""
    settings: SqliteStoreSettings | PostgresStoreSettings
    if kind == "sqlite":
        settings = SqliteStoreSettings(path=scratch.tmp_path / "kied.db")
    else:
        url = await trio.to_thread.run_sync(scratch.pg.new)
        settings = PostgresStoreSettings(url=url, pool_size=1)  # a limiter of one
    async with open_store(settings) as store:
        assert isinstance(store, SqliteStore | PostgresStore)
        yield store


@pytest.fixture(params=DATABASE_STORES)
def database_scratch(
    request: pytest.FixtureRequest, tmp_path: Path, pg_databases: PgDatabases
) -> tuple[str, Scratch]:
    return request.param, Scratch(tmp_path, pg_databases)


async def test_each_operation_is_one_thread_hop(
    database_scratch: tuple[str, Scratch], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread hop, not the database, is the cost of a write: a whole operation is one hop.
    hops = 0
    run_sync = trio.to_thread.run_sync

    async def counting_run_sync(*args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await run_sync(*args, **kwargs)

    async with _database_store(*database_scratch) as store:
        monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
        report = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
        await store.record_callback(make_inbox_entry(task_id="t"), report)
        job, _ = await store.create_job(make_new_job(task_id="t"))
        await store.record_callback(make_inbox_entry(task_id="t"), report)
        await store.apply(job.id, report, now=2_000.0)
        assert hops == 4


@dataclass
class _Call:
    """One ``record_callback`` running in its own task and cancel scope."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    result: CallbackRecord | Exception | None = None


async def _start_record(
    nursery: trio.Nursery, store: JobStore, task_id: str, report: Report | None
) -> _Call:
    """Start the call and return once it is blocked (queued, or waiting for the connection)."""
    call = _Call()

    async def record() -> None:
        with call.scope:
            try:
                call.result = await store.record_callback(make_inbox_entry(task_id=task_id), report)
            except Exception as exc:
                call.result = exc

    nursery.start_soon(record)
    await trio.testing.wait_all_tasks_blocked()
    return call


@pytest.fixture
async def queued_store(
    database_scratch: tuple[str, Scratch],
) -> AsyncIterator[SqliteStore | PostgresStore]:
    async with _database_store(*database_scratch) as store:
        for i in range(4):
            await store.create_job(make_new_job(task_id=f"t{i}"))
        yield store


async def _recorded_tasks(store: JobStore) -> list[str | None]:
    return [c.entry.task_id for c in reversed(await store.list_callbacks())]


SUCCESS = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)


def _counting_hops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ``trio.to_thread.run_sync`` calls from now on, in the returned one-item list."""
    hops = [0]
    run_sync = trio.to_thread.run_sync

    async def counting_run_sync(*args: Any, **kwargs: Any) -> Any:
        hops[0] += 1
        return await run_sync(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    return hops


async def test_queued_callbacks_are_written_together(
    queued_store: SqliteStore | PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = queued_store
    bad = Report(event=E.SUCCEEDED, source=EndedBy.CALLBACK, result={"x": object()})  # type: ignore[dict-item]
    hops = _counting_hops(monkeypatch)
    async with trio.open_nursery() as nursery:
        async with store._limiter:  # hold the connection: the first writer waits
            first = await _start_record(nursery, store, "t0", SUCCESS)
            queued = [
                await _start_record(nursery, store, "t1", SUCCESS),
                await _start_record(nursery, store, "t2", bad),
                await _start_record(nursery, store, "t1", SUCCESS),
                await _start_record(nursery, store, "t3", None),
            ]
    assert hops == [2]  # the first callback alone, then the ones queued behind it
    assert isinstance(first.result, CallbackRecord)
    assert first.result.effect is CallbackEffect.CHANGED
    effects = [
        c.result.effect if isinstance(c.result, CallbackRecord) else c.result for c in queued
    ]
    assert effects[0] is CallbackEffect.CHANGED
    assert isinstance(effects[1], TypeError)  # only that callback fails
    assert effects[2:] == [CallbackEffect.NO_OP, CallbackEffect.NOT_APPLICABLE]
    assert await _recorded_tasks(store) == ["t0", "t1", "t1", "t3"]
    job = await store.get_job_by_task(TaskId("t2"))
    assert job is not None
    assert job.state is S.PENDING


async def test_callback_batches_are_bounded(
    queued_store: SqliteStore | PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = queued_store
    monkeypatch.setattr(f"{type(store).__module__}._MAX_CALLBACK_BATCH", 2)
    hops = _counting_hops(monkeypatch)
    async with trio.open_nursery() as nursery:
        async with store._limiter:
            calls = [await _start_record(nursery, store, f"t{i % 4}", None) for i in range(5)]
    assert hops == [3]  # the first alone, then two batches of two
    assert all(isinstance(c.result, CallbackRecord) for c in calls)
    assert await _recorded_tasks(store) == ["t0", "t1", "t2", "t3", "t0"]


async def test_cancelled_queued_callback_is_not_written(
    queued_store: SqliteStore | PostgresStore,
) -> None:
    store = queued_store
    async with trio.open_nursery() as nursery:
        async with store._limiter:
            first = await _start_record(nursery, store, "t0", SUCCESS)
            second = await _start_record(nursery, store, "t1", SUCCESS)
            third = await _start_record(nursery, store, "t2", SUCCESS)
            second.scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
    assert second.scope.cancelled_caught
    assert second.result is None
    assert isinstance(first.result, CallbackRecord)
    assert isinstance(third.result, CallbackRecord)
    assert await _recorded_tasks(store) == ["t0", "t2"]


async def test_cancelled_writer_hands_the_queue_on(
    queued_store: SqliteStore | PostgresStore,
) -> None:
    store = queued_store
    async with trio.open_nursery() as nursery:
        async with store._limiter:
            first = await _start_record(nursery, store, "t0", SUCCESS)
            queued = [await _start_record(nursery, store, f"t{i}", SUCCESS) for i in (1, 2)]
            await trio.testing.wait_all_tasks_blocked()
            first.scope.cancel()  # still waiting for the connection: nothing written
            await trio.testing.wait_all_tasks_blocked()
    assert first.scope.cancelled_caught
    assert all(isinstance(c.result, CallbackRecord) for c in queued)
    assert await _recorded_tasks(store) == ["t1", "t2"]


async def test_writer_cancelled_as_it_is_handed_the_queue(
    queued_store: SqliteStore | PostgresStore,
) -> None:
    store = queued_store
    calls: list[_Call] = []

    async def first_then_cancel_second() -> None:
        await store.record_callback(make_inbox_entry(task_id="t0"), SUCCESS)
        # The second task has just been handed the queue and has not run yet.
        calls[0].scope.cancel()

    async with trio.open_nursery() as nursery:
        async with store._limiter:
            nursery.start_soon(first_then_cancel_second)
            await trio.testing.wait_all_tasks_blocked()
            calls.append(await _start_record(nursery, store, "t1", SUCCESS))
            calls.append(await _start_record(nursery, store, "t2", SUCCESS))
    assert calls[0].scope.cancelled_caught
    assert isinstance(calls[1].result, CallbackRecord)
    assert await _recorded_tasks(store) == ["t0", "t2"]


async def test_waiter_cancelled_as_it_is_handed_the_queue(
    queued_store: SqliteStore | PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = queued_store
    calls: list[_Call] = []
    hand_off = store._hand_off_callbacks

    def cancel_then_hand_off() -> None:
        # The cancellation reaches the second task first; then it is handed the queue.
        if not calls[1].scope.cancel_called:
            calls[1].scope.cancel()
        hand_off()

    async with trio.open_nursery() as nursery:
        async with store._limiter:
            calls.append(await _start_record(nursery, store, "t0", SUCCESS))
            calls.append(await _start_record(nursery, store, "t1", SUCCESS))
            calls.append(await _start_record(nursery, store, "t2", SUCCESS))
            monkeypatch.setattr(store, "_hand_off_callbacks", cancel_then_hand_off)
    assert calls[1].scope.cancelled_caught
    assert isinstance(calls[2].result, CallbackRecord)
    assert await _recorded_tasks(store) == ["t0", "t2"]


async def test_queued_callbacks_fail_when_the_store_closes(
    queued_store: SqliteStore | PostgresStore,
) -> None:
    store = queued_store
    async with trio.open_nursery() as nursery:
        async with store._limiter:
            calls = [await _start_record(nursery, store, f"t{i}", SUCCESS) for i in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(store.aclose)
            await trio.testing.wait_all_tasks_blocked()
    assert all(isinstance(c.result, StoreUnavailableError) for c in calls)


async def _many_concurrent_callbacks(stores: list[JobStore]) -> None:
    """200 callbacks for 50 jobs from 200 tasks, spread over ``stores``."""
    jobs = [(await stores[0].create_job(make_new_job(task_id=f"t{i}")))[0] for i in range(50)]
    records: list[CallbackRecord] = []

    async def send(i: int) -> None:
        event = (E.SUCCEEDED, E.FAILED, E.PROGRESS, E.SUCCEEDED)[i % 4]
        entry = make_inbox_entry(task_id=f"t{i % 50}", received_at=2_000.0 + i)
        store = stores[i % len(stores)]
        records.append(await store.record_callback(entry, _report(event, source=EndedBy.CALLBACK)))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(send, i)
    assert len(records) == 200
    assert len({r.inbox_id for r in records}) == 200
    for job in jobs:
        mine = [r for r in records if r.job is not None and r.job.id == job.id]
        assert len(mine) == 4
        ended = [r for r in mine if r.job is not None and r.job.terminal]
        assert [r.effect for r in ended].count(CallbackEffect.CHANGED) == 1
    assert len(await stores[0].list_callbacks(limit=1_000)) == 200


async def test_many_concurrent_callbacks(database_scratch: tuple[str, Scratch]) -> None:
    async with _database_store(*database_scratch) as store:
        await _many_concurrent_callbacks([store])


# ------------------------------------------------------------------- PostgreSQL only
# Several stores on one database stand for several instances during a deploy.


def _dbname(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]  # type: ignore[return-value]


async def _admin(pg_url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own, as another client of the database."""

    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            cursor = conn.execute(query, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    return await trio.to_thread.run_sync(run)


async def test_postgres_many_concurrent_callbacks_from_two_stores(pg_url: str) -> None:
    settings = PostgresStoreSettings(url=pg_url)
    async with open_store(settings) as one, open_store(settings) as two:
        await _many_concurrent_callbacks([one, two])


async def test_postgres_two_stores_have_exactly_one_winner(pg_url: str) -> None:
    settings = PostgresStoreSettings(url=pg_url)
    async with open_store(settings) as one, open_store(settings) as two:
        for _ in range(5):
            job = await _job_in(one, S.PENDING)
            results: list[Job | None] = []

            async def write(
                store: JobStore, i: int, job_id: JobId, results: list[Job | None]
            ) -> None:
                # Each of these ends the job for good (timed_out could still be replaced).
                event = (E.SUCCEEDED, E.FAILED, E.CANCEL)[i % 3]
                results.append(await store.apply(job_id, _report(event), now=2_000.0 + i))

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(write, (one, two)[i % 2], i, job.id, results)
            winners = [r for r in results if r is not None]
            assert len(results) == 20
            assert len(winners) == 1
            assert await two.get_job(job.id) == winners[0]


@pytest.mark.parametrize("same", ["idempotency_key", "task_id"])
async def test_postgres_one_key_from_two_stores_makes_one_job(pg_url: str, same: str) -> None:
    settings = PostgresStoreSettings(url=pg_url)
    async with open_store(settings) as one, open_store(settings) as two:
        results: list[tuple[Job, bool]] = []

        async def create(store: JobStore, i: int) -> None:
            new = make_new_job(created_at=1_000.0 + i, **{same: "the-same"})  # type: ignore[arg-type]
            results.append(await store.create_job(new))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(create, (one, two)[i % 2], i)
        created = [job for job, new in results if new]
        assert len(created) == 1
        assert len(results) == 20
        assert all(job == created[0] for job, _ in results)
        assert await two.list_jobs() == created


async def test_postgres_a_callback_and_its_job_from_two_stores_always_meet(pg_url: str) -> None:
    # The job is created on one instance while its callback lands on the other: whichever
    # commits second must see the first, or the outcome would wait for the poller.
    settings = PostgresStoreSettings(url=pg_url)
    async with open_store(settings) as one, open_store(settings) as two:

        async def create(i: int) -> None:
            await one.create_job(make_new_job(task_id=f"t{i}", created_at=1_000.0))

        async def callback(i: int) -> None:
            entry = make_inbox_entry(task_id=f"t{i}", received_at=1_001.0)
            await two.record_callback(entry, SUCCESS)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(create, i)
                nursery.start_soon(callback, i)
        for i in range(60):
            job = await one.get_job_by_task(TaskId(f"t{i}"))
            assert job is not None
            assert job.state is S.SUCCEEDED, f"t{i}: the callback and the job missed each other"
            [stored] = await one.list_callbacks(task_id=TaskId(f"t{i}"))
            assert (stored.effect, stored.matched_job_id) == (CallbackEffect.CHANGED, job.id)


async def test_postgres_migrations_run_once_when_stores_open_together(
    pg_databases: PgDatabases,
) -> None:
    url = await trio.to_thread.run_sync(partial(pg_databases.new, empty=True))
    settings = PostgresStoreSettings(url=url, pool_size=2)
    stores: list[PostgresStore] = []

    async def connect() -> None:
        stores.append(await PostgresStore.connect(settings))

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(connect)
    finally:
        for store in stores:
            await store.aclose()
    assert len(stores) == 4
    versions = await _admin(url, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(n,) for n in range(1, len(POSTGRES_MIGRATIONS) + 1)]


async def test_postgres_job_changes_are_announced_as_they_commit(pg_url: str) -> None:
    # Other instances LISTEN on kied_jobs: a new job, a state, task or KIE state change is
    # a note carrying the job id; a poller's error note is not.
    listener = await trio.to_thread.run_sync(partial(psycopg.connect, pg_url, autocommit=True))
    try:
        await trio.to_thread.run_sync(listener.execute, "LISTEN kied_jobs")
        async with open_store(PostgresStoreSettings(url=pg_url)) as store:
            job, _ = await store.create_job(make_new_job())  # 1
            await store.attach_task(job.id, TaskId("t-1"), now=1_001.0)  # 2
            await store.apply(job.id, _report(E.PROGRESS), now=1_002.0)  # 3: KIE state
            await store.apply(job.id, _report(E.PROGRESS), now=1_003.0)  # the same: none
            await store.note_error(job.id, "KIE answered 502", now=1_004.0)  # none
            await store.record_callback(make_inbox_entry(task_id="t-1"), SUCCESS)  # 4
            other, _ = await store.create_job(make_new_job())  # 5

        def notes() -> list[str]:
            return [n.payload for n in listener.notifies(timeout=0.5)]

        assert await trio.to_thread.run_sync(notes) == [job.id] * 4 + [other.id]
    finally:
        await trio.to_thread.run_sync(listener.close)


async def test_postgres_a_request_to_confirm_is_announced(pg_url: str) -> None:
    # The leader hears of it whichever instance took the callback.
    listener = await trio.to_thread.run_sync(partial(psycopg.connect, pg_url, autocommit=True))
    try:
        async with open_store(PostgresStoreSettings(url=pg_url)) as store:
            job = await _job_in(store, S.PENDING, task_id="t-1")
            await trio.to_thread.run_sync(listener.execute, "LISTEN kied_jobs")
            entry = _signed_only("t-1", received_at=1_200.0)
            record = await store.record_callback(entry, SUCCESS)
            assert record.effect is CallbackEffect.CONFIRMING
            await store.record_callback(entry, SUCCESS)  # no newer request: none

        def notes() -> list[str]:
            return [n.payload for n in listener.notifies(timeout=0.5)]

        assert await trio.to_thread.run_sync(notes) == [job.id]
    finally:
        await trio.to_thread.run_sync(listener.close)


async def test_postgres_refuses_a_newer_schema(pg_url: str) -> None:
    newer = len(POSTGRES_MIGRATIONS) + 1
    await _admin(pg_url, "INSERT INTO schema_version (version, applied_at) VALUES (%s, 0)", newer)
    with pytest.raises(StoreUnavailableError, match=f"schema version {newer}, newer than"):
        async with open_store(PostgresStoreSettings(url=pg_url)):
            pass


async def test_postgres_data_survives_reopen(pg_url: str) -> None:
    settings = PostgresStoreSettings(url=pg_url)
    async with open_store(settings) as store:
        job = await _job_in(store, S.SUCCEEDED, task_id="t-1", metadata={"chat": 1})
        await store.record_callback(make_inbox_entry(task_id="t-1"), SUCCESS)
    async with open_store(settings) as store:
        assert await store.get_job(job.id) == job
        [stored] = await store.list_callbacks()
        assert stored.effect is CallbackEffect.NO_OP


async def _lock_waiters(pg_url: str) -> list[int]:
    """The backends of the database that wait for a lock."""
    rows = await _admin(
        pg_url,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
        _dbname(pg_url),
    )
    return [pid for (pid,) in rows]


async def _wait_for_lock_waiter(pg_url: str, *, other_than: Collection[int] = ()) -> int:
    async def waiters() -> list[int]:
        return [pid for pid in await _lock_waiters(pg_url) if pid not in other_than]

    pids: list[int] = await wait_for(waiters, interval=0.01)
    return pids[0]


async def _terminate(pg_url: str, pids: Collection[int] | None = None) -> list[int]:
    """End connections as an operator or a restart does: ``pids``, or all the database's."""
    if pids is None:
        rows = await _admin(
            pg_url,
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            _dbname(pg_url),
        )
        pids = [pid for (pid,) in rows]
    assert pids
    await _admin(
        pg_url, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", list(pids)
    )

    async def ended() -> bool:  # the server ends them a moment after it is asked
        sql = "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)"
        return not await _admin(pg_url, sql, list(pids))

    await wait_for(ended, interval=0.01)
    return list(pids)


async def test_postgres_survives_terminated_idle_connections(pg_url: str) -> None:
    async with open_store(PostgresStoreSettings(url=pg_url, pool_size=3)) as store:
        job = await _job_in(store, S.PENDING)
        for restart in range(2):
            await _terminate(pg_url)
            assert await store.get_job(job.id) == job  # a read
            await store.note_error(job.id, f"restart {restart}", now=1_500.0 + restart)  # a write
            job = replace(job, last_error=f"restart {restart}", updated_at=1_500.0 + restart)
        ended = await store.apply(job.id, SUCCESS, now=2_000.0)
        assert ended is not None
        assert ended.state is S.SUCCEEDED


async def test_postgres_write_is_tried_again_when_its_connection_dies_before_commit(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(PostgresStoreSettings(url=pg_url, pool_size=2)) as store:
        job = await _job_in(store, S.PENDING)
        results: list[Job | None] = []

        def hold_the_row() -> psycopg.Connection[tuple[Any, ...]]:
            # Another client holds the job's row: the store's UPDATE waits for it, inside
            # its transaction, where the test ends its connection.
            conn = psycopg.connect(pg_url, autocommit=True)
            conn.execute("BEGIN")
            conn.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
            return conn

        holder = await trio.to_thread.run_sync(hold_the_row)
        try:
            async with trio.open_nursery() as nursery:

                async def apply() -> None:
                    results.append(await store.apply(job.id, SUCCESS, now=2_000.0))

                nursery.start_soon(apply)
                first = await _wait_for_lock_waiter(pg_url)
                await _terminate(pg_url, [first])
                # The second attempt, on a new connection, waits for the row in its turn.
                await _wait_for_lock_waiter(pg_url, other_than=[first])
                await trio.to_thread.run_sync(holder.rollback)
        finally:
            await trio.to_thread.run_sync(holder.close)
        [ended] = results
        assert ended is not None
        assert ended.state is S.SUCCEEDED
        assert "AdminShutdown" in caplog.text
        assert "trying again" in caplog.text


async def test_postgres_cancelled_write_runs_to_its_end(pg_url: str) -> None:
    async with open_store(PostgresStoreSettings(url=pg_url, pool_size=2)) as store:
        job = await _job_in(store, S.PENDING)
        holder = await trio.to_thread.run_sync(partial(psycopg.connect, pg_url, autocommit=True))
        try:
            await trio.to_thread.run_sync(holder.execute, "BEGIN")
            await trio.to_thread.run_sync(
                holder.execute, "SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job.id,)
            )
            done = trio.Event()
            scope = trio.CancelScope()
            results: list[Job | None] = []

            async def apply() -> None:
                with scope:
                    results.append(await store.apply(job.id, SUCCESS, now=2_000.0))
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(apply)
                await _wait_for_lock_waiter(pg_url)
                scope.cancel()
                with trio.move_on_after(0.2):
                    await done.wait()
                assert not done.is_set()  # the write is not abandoned half way
                await trio.to_thread.run_sync(holder.rollback)
        finally:
            await trio.to_thread.run_sync(holder.close)
        # Seen through to its commit: its caller has the outcome, which is stored.
        [ended] = results
        assert ended is not None
        assert ended.state is S.SUCCEEDED
        assert await store.get_job(job.id) == ended


async def test_postgres_cancelled_read_returns_at_once(
    pg_server: PgServer, pg_url: str, nursery: trio.Nursery
) -> None:
    proxy = PgProxy(pg_server)
    await nursery.start(proxy.run)
    settings = PostgresStoreSettings(url=proxy.url(_dbname(pg_url)), pool_size=2)
    async with open_store(settings) as store:
        job = await _job_in(store, S.PENDING)
        proxy.stall()  # the server seems to hang
        start = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await store.get_job(job.id)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 1.0
        proxy.flow()
        assert await store.get_job(job.id) == job


async def test_postgres_unreachable_server_fails_at_once() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = trio.current_time()
    with pytest.raises(StoreUnavailableError) as info:
        async with open_store(
            PostgresStoreSettings(url=f"postgresql://postgres@127.0.0.1:{port}/kied")
        ):
            pass
    assert trio.current_time() - start < 2.0
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert "refused" in str(info.value)


async def test_postgres_lost_server_fails_within_the_bound_and_the_store_recovers(
    pg_server: PgServer, pg_url: str, nursery: trio.Nursery
) -> None:
    proxy = PgProxy(pg_server)
    await nursery.start(proxy.run)
    settings = PostgresStoreSettings(
        url=proxy.url(_dbname(pg_url)), pool_size=2, connect_timeout_s=1.0
    )
    async with open_store(settings) as store:
        job = await _job_in(store, S.PENDING)
        proxy.cut()  # every connection closed, and new ones refused
        for operation in (
            lambda: store.get_job(job.id),
            lambda: store.apply(job.id, SUCCESS, now=2_000.0),
        ):
            start = trio.current_time()
            with pytest.raises(StoreUnavailableError):
                await operation()
            # The pool's wait for a connection (connect_timeout_s), plus a little.
            assert trio.current_time() - start < settings.connect_timeout_s + 1.0
        await nursery.start(proxy.run)  # the server is back, on the same port

        async def answers() -> bool:
            try:
                await store.ping()
            except StoreUnavailableError:
                return False
            return True

        # The pool reconnects with a backoff of 1, 2, 4 s...
        await wait_for(answers, within_s=15, interval=0.1)
        assert await store.get_job(job.id) == job


@pytest.mark.parametrize(
    ("error", "write", "commit_sent", "connection_lost", "retried"),
    [
        (psycopg.OperationalError("server closed the connection"), False, False, True, True),
        (psycopg.OperationalError("server closed the connection"), True, False, True, True),
        # The write may have committed: running it again could answer differently.
        (psycopg.OperationalError("server closed the connection"), True, True, True, False),
        # The server rolled back itself.
        (psycopg.errors.DeadlockDetected("deadlock detected"), True, False, False, True),
        (psycopg.errors.SerializationFailure("could not serialize"), True, True, False, True),
        # A live connection answered with an error: the same answer would come again.
        (psycopg.errors.QueryCanceled("statement timeout"), False, False, False, False),
        (psycopg.errors.UniqueViolation("duplicate key"), True, False, False, False),
        # The pool already waited its bound for a connection.
        (psycopg_pool.PoolTimeout("no connection"), False, False, False, False),
    ],
)
async def test_postgres_retry_rule(
    error: psycopg.Error, write: bool, commit_sent: bool, connection_lost: bool, retried: bool
) -> None:
    attempt = _Attempt(write=write, commit_sent=commit_sent, connection_lost=connection_lost)
    assert _may_retry(error, attempt) is retried


async def test_postgres_connection_defaults_merge_into_the_url() -> None:
    url = "postgresql://kied@db.example:6543/kied?keepalives_idle=60&sslmode=require"
    info = psycopg.conninfo.conninfo_to_dict(
        _conninfo(PostgresStoreSettings(url=url, connect_timeout_s=0.5))
    )
    assert info == {
        "user": "kied",
        "host": "db.example",
        "port": "6543",
        "dbname": "kied",
        "sslmode": "require",
        "keepalives_idle": "60",  # the URL's own value wins
        "keepalives": "1",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "20000",
        "connect_timeout": "2",  # whole seconds, at least 2
        "application_name": "kied",
    }
    with pytest.raises(ConfigError) as error:
        _conninfo(PostgresStoreSettings(url="postgresql://db.example/kied?no_such_option=1"))
    assert error.value.setting == "KIED_DATABASE_URL"


async def test_postgres_a_callback_the_server_refuses_fails_alone_in_its_batch(
    pg_databases: PgDatabases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL text cannot hold NUL: that callback fails the batch's transaction, and
    # the batch is written again one callback at a time, in the same thread hop.
    refused = Report(event=E.FAILED, source=EndedBy.CALLBACK, error_message="a \x00 b")
    async with _database_store("postgres", Scratch(tmp_path, pg_databases)) as store:
        for i in range(4):
            await store.create_job(make_new_job(task_id=f"t{i}"))
        hops = _counting_hops(monkeypatch)
        async with trio.open_nursery() as nursery:
            async with store._limiter:
                first = await _start_record(nursery, store, "t0", SUCCESS)
                queued = [
                    await _start_record(nursery, store, "t1", SUCCESS),
                    await _start_record(nursery, store, "t2", refused),
                    await _start_record(nursery, store, "t3", None),
                ]
        assert hops == [2]
        assert isinstance(first.result, CallbackRecord)
        results = [c.result for c in queued]
        assert isinstance(results[0], CallbackRecord)
        assert results[0].effect is CallbackEffect.CHANGED
        assert isinstance(results[1], StoreUnavailableError)
        assert isinstance(results[1].__cause__, psycopg.DataError)
        assert isinstance(results[2], CallbackRecord)
        assert results[2].effect is CallbackEffect.NOT_APPLICABLE
        assert await _recorded_tasks(store) == ["t0", "t1", "t3"]
        job = await store.get_job_by_task(TaskId("t2"))
        assert job is not None
        assert job.state is S.PENDING


async def test_without_psycopg_sqlite_opens_and_postgres_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg is the optional kied[postgres] extra.
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    monkeypatch.delitem(sys.modules, "kied.store._postgres")
    async with open_store(SqliteStoreSettings(path=tmp_path / "kied.db")) as store:
        await store.ping()
    with pytest.raises(ConfigError) as info:
        async with open_store(PostgresStoreSettings(url="postgresql://127.0.0.1/kied")):
            pass
    assert info.value.setting == "KIED_DATABASE_URL"
    assert "kied[postgres]" in str(info.value)


# ------------------------------------------------------------------- the event log


async def _types(store: JobStore, job_id: str) -> list[str]:
    return [e.type for e in await store.list_events(limit=1000) if e.job_id == job_id]


async def test_every_change_the_application_cares_about_is_one_event(store: JobStore) -> None:
    job, _ = await store.create_job(make_new_job(created_at=1_000.0))
    await store.attach_task(job.id, TaskId("t-1"), now=1_001.0)
    await store.apply(job.id, _report(E.PROGRESS), now=1_002.0)  # progress: no event
    await store.attach_task(job.id, TaskId("t-1"), now=1_003.0)  # a repeat: none
    await store.note_error(job.id, "KIE answered 502", now=1_004.0)  # none
    await store.apply(job.id, _report(E.SUCCEEDED), now=1_005.0)
    await store.apply(job.id, _report(E.FAILED), now=1_006.0)  # a no-op: none
    assert await _types(store, job.id) == ["job.created", "job.submitted", "job.succeeded"]
    events = [e for e in await store.list_events() if e.job_id == job.id]
    assert [e.created_at for e in events] == [1_000.0, 1_001.0, 1_005.0]
    assert all(e.id.startswith("evt_") for e in events)
    assert len({e.id for e in events}) == 3
    # each carries the job as the API showed it then
    assert [(e.job["state"], e.job["task_id"]) for e in events] == [
        ("submitting", None),
        ("pending", "t-1"),
        ("succeeded", "t-1"),
    ]
    assert events[2].job["result_urls"] == list(_report(E.SUCCEEDED).result_urls)
    assert events[2].job["ended_by"] == "poll"


async def test_deadline_cancel_and_a_late_outcome_are_events(store: JobStore) -> None:
    timed = await _job_in(store, S.PENDING, task_id="t-late")
    await store.apply(timed.id, _report(E.DEADLINE), now=1_100.0)
    await store.apply(timed.id, _report(E.SUCCEEDED), now=1_200.0)
    assert await _types(store, timed.id) == [
        "job.created",
        "job.timed_out",
        "job.updated",
    ]
    [*_, updated] = [e for e in await store.list_events() if e.job_id == timed.id]
    assert (updated.job["state"], updated.job["late"]) == ("succeeded", True)
    cancelled = await _job_in(store, S.SUBMITTING)
    await store.apply(cancelled.id, _report(E.CANCEL), now=1_300.0)
    failed = await _job_in(store, S.PENDING, task_id="t-f")
    await store.apply(failed.id, _report(E.FAILED), now=1_300.0)
    assert await _types(store, cancelled.id) == ["job.created", "job.cancelled"]
    assert await _types(store, failed.id) == ["job.created", "job.failed"]


async def test_callbacks_write_their_events(store: JobStore) -> None:
    adopting = await _job_in(store, S.SUBMITTING)
    entry = make_inbox_entry(task_id="t-a", job_id=adopting.id, received_at=1_100.0)
    await store.record_callback(entry, _report(E.SUCCEEDED, source=EndedBy.CALLBACK))
    assert await _types(store, adopting.id) == ["job.created", "job.submitted", "job.succeeded"]
    # an early callback applied when the job is created with its task
    early = make_inbox_entry(task_id="t-early", outcome="fail", received_at=1_200.0)
    await store.record_callback(early, _report(E.FAILED, source=EndedBy.CALLBACK))
    tracked, _ = await store.create_job(make_new_job(task_id="t-early", created_at=1_300.0))
    assert await _types(store, tracked.id) == ["job.created", "job.failed"]
    # rejected, other-task and repeated callbacks write none
    before = len(await store.list_events(limit=1000))
    await store.record_callback(
        make_inbox_entry(task_id="t-a", authenticated=False),
        _report(E.FAILED, source=EndedBy.CALLBACK),
    )
    await store.record_callback(
        make_inbox_entry(task_id="t-other", job_id=adopting.id),
        _report(E.FAILED, source=EndedBy.CALLBACK),
    )
    await store.record_callback(
        make_inbox_entry(task_id="t-a"), _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    )
    assert len(await store.list_events(limit=1000)) == before


async def test_events_resume_after_any_cursor(store: JobStore) -> None:
    for i in range(7):
        job, _ = await store.create_job(make_new_job(created_at=1_000.0 + i))
        await store.apply(job.id, _report(E.CANCEL), now=1_000.5 + i)
    everything = await store.list_events(limit=1000)
    cursors = [e.cursor for e in everything]
    assert len(cursors) == 14
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == 14
    for i, event in enumerate(everything):
        assert await store.list_events(after=event.cursor, limit=1000) == everything[i + 1 :]
    assert await store.list_events(after=0, limit=3) == everything[:3]
    assert await store.list_events(after=cursors[-1]) == []


async def test_old_events_are_pruned_in_batches(store: JobStore) -> None:
    for i in range(5):
        await store.create_job(make_new_job(created_at=1_000.0 + i))
    assert await store.prune_events(before=1_003.0, limit=2) == 2
    assert await store.prune_events(before=1_003.0, limit=2) == 1
    assert await store.prune_events(before=1_003.0, limit=2) == 0
    left = await store.list_events()
    assert [e.created_at for e in left] == [1_003.0, 1_004.0]
    # the cursor keeps growing after a prune
    newest, _ = await store.create_job(make_new_job(created_at=1_005.0))
    [*_, last] = await store.list_events()
    assert last.job_id == newest.id
    assert last.cursor > left[-1].cursor


async def test_jobs_are_found_by_their_metadata(store: JobStore) -> None:
    chat = await store.create_job(make_new_job(metadata={"chat_id": 42, "kind": "photo"}))
    other = await store.create_job(make_new_job(metadata={"chat_id": "42", "kind": "video"}))
    flagged = await store.create_job(make_new_job(metadata={"vip": True, "chat_id": 7}))
    nested = await store.create_job(make_new_job(metadata={"chat_id": {"id": 42}}))
    await store.create_job(make_new_job(metadata=None))
    ids = {"chat": chat[0].id, "other": other[0].id, "flagged": flagged[0].id}

    async def found(**metadata: str) -> set[str]:
        jobs = await store.list_jobs(metadata=metadata)
        return {name for name, job_id in ids.items() if job_id in {j.id for j in jobs}} | (
            {"nested"} if nested[0].id in {j.id for j in jobs} else set()
        )

    assert await found(chat_id="42") == {"chat", "other"}
    assert await found(chat_id="42", kind="photo") == {"chat"}
    assert await found(vip="true") == {"flagged"}
    assert await found(vip="True") == set()
    assert await found(missing="x") == set()
    assert await found(**{"kind": "video"}) == {"other"}
    both = await store.list_jobs(metadata={"chat_id": "42"}, states=["cancelled"])
    assert both == []
    assert len(await store.list_jobs(metadata={"chat_id": "42"}, limit=1)) == 1


async def test_a_jobs_callback_trail(store: JobStore) -> None:
    job = await _job_in(store, S.SUBMITTING)
    other = await _job_in(store, S.PENDING, task_id="t-other")
    success = _report(E.SUCCEEDED, source=EndedBy.CALLBACK)
    await store.record_callback(
        make_inbox_entry(task_id="t-1", job_id=job.id, outcome="pending"),
        _report(E.PROGRESS, source=EndedBy.CALLBACK),
    )
    await store.record_callback(make_inbox_entry(task_id="t-other"), success)
    await store.record_callback(make_inbox_entry(task_id="t-1"), success)
    await store.record_callback(
        make_inbox_entry(task_id=None, job_id=job.id, authenticated=False), None
    )
    trail = await store.list_callbacks(job_id=job.id)
    assert [(c.entry.task_id, c.effect) for c in trail] == [
        (None, CallbackEffect.REJECTED),
        ("t-1", CallbackEffect.CHANGED),
        ("t-1", CallbackEffect.CHANGED),
    ]
    assert [c.entry.task_id for c in await store.list_callbacks(job_id=other.id)] == ["t-other"]
    assert len(await store.list_callbacks(job_id=job.id, task_id=TaskId("t-1"))) == 2


# ------------------------------------------------------------------- webhook deliveries


def _delivery(event_id: str, endpoint: str, *, cursor: int = 1, at: float = 1_000.0):
    from kied.store import NewDelivery

    return NewDelivery(
        event_id=event_id,
        event_cursor=cursor,
        job_id=JobId("job-1"),
        type="job.succeeded",
        endpoint=endpoint,
        body='{"type":"job.succeeded"}',
        created_at=at,
    )


async def test_deliveries_are_queued_once_and_the_cursor_only_grows(store: JobStore) -> None:
    assert await store.webhook_cursor() == 0
    first = [_delivery("evt_1", "https://a.test/h"), _delivery("evt_1", "https://b.test/h")]
    assert await store.enqueue_deliveries(first, cursor=5) == 2
    # a new leader that read the log from an older cursor repeats them: nothing doubles
    assert await store.enqueue_deliveries(first, cursor=3) == 0
    assert await store.webhook_cursor() == 5
    assert await store.enqueue_deliveries([], cursor=9) == 0
    assert await store.webhook_cursor() == 9
    listed = await store.list_deliveries()
    assert [(d.event_id, d.endpoint, d.state, d.attempts) for d in listed] == [
        ("evt_1", "https://b.test/h", DeliveryState.PENDING, 0),
        ("evt_1", "https://a.test/h", DeliveryState.PENDING, 0),
    ]
    assert listed[0].body == '{"type":"job.succeeded"}'


async def test_attempts_move_a_delivery_on(store: JobStore) -> None:
    from kied.store import DeliveryAttempt

    await store.enqueue_deliveries(
        [
            _delivery("evt_1", "https://a.test/h"),
            _delivery("evt_2", "https://a.test/h", at=1_001.0),
        ],
        cursor=2,
    )
    assert await store.next_delivery_at() == 1_000.0
    due = await store.due_deliveries(now=1_000.5, limit=10)
    assert [d.event_id for d in due] == ["evt_1"]
    one = due[0]
    attempt = DeliveryAttempt(
        delivery_id=one.id, attempted_at=1_002.0, status_code=500, duration_s=0.1, error="HTTP 500"
    )
    await store.record_attempt(attempt, state=DeliveryState.PENDING, next_attempt_at=1_007.0)
    assert [d.event_id for d in await store.due_deliveries(now=1_005.0, limit=10)] == ["evt_2"]
    ok = DeliveryAttempt(
        delivery_id=one.id, attempted_at=1_008.0, status_code=204, duration_s=0.05, error=None
    )
    await store.record_attempt(ok, state=DeliveryState.DELIVERED, next_attempt_at=None)
    [after] = await store.list_deliveries(event_id="evt_1")
    assert (after.state, after.attempts, after.last_status, after.delivered_at) == (
        DeliveryState.DELIVERED,
        2,
        204,
        1_008.0,
    )
    assert [(a.status_code, a.error) for a in await store.list_attempts(one.id)] == [
        (500, "HTTP 500"),
        (204, None),
    ]
    # an attempt that finishes after the delivery stopped being pending changes nothing
    await store.record_attempt(attempt, state=DeliveryState.FAILED, next_attempt_at=None)
    [still] = await store.list_deliveries(event_id="evt_1")
    assert still.state is DeliveryState.DELIVERED
    assert await store.next_delivery_at() == 1_001.0


async def test_a_gone_endpoint_is_disabled_and_redelivery_enables_it(store: JobStore) -> None:
    await store.enqueue_deliveries(
        [
            _delivery("evt_1", "https://gone.test/h"),
            _delivery("evt_2", "https://gone.test/h", at=1_001.0),
            _delivery("evt_2", "https://ok.test/h", at=1_001.0),
        ],
        cursor=2,
    )
    assert await store.disable_endpoint("https://gone.test/h", reason="410 Gone", now=1_010.0) == 2
    assert await store.disabled_endpoints() == {"https://gone.test/h": "410 Gone"}
    failed = await store.list_deliveries(state=DeliveryState.FAILED)
    assert {(d.event_id, d.last_error) for d in failed} == {
        ("evt_1", "410 Gone"),
        ("evt_2", "410 Gone"),
    }
    assert await store.list_deliveries(state=DeliveryState.FAILED, since=1_000.5) == failed[:1]
    assert await store.redeliver(failed_since=1_001.0, now=1_020.0) == 1
    assert await store.disabled_endpoints() == {}
    due = await store.due_deliveries(now=1_020.0, limit=10)
    assert {(d.event_id, d.endpoint, d.attempts) for d in due} == {
        ("evt_2", "https://gone.test/h", 0),
        ("evt_2", "https://ok.test/h", 0),
    }
    assert await store.redeliver(event_id="evt_1", now=1_030.0) == 1
    assert await store.redeliver(event_id="nope", now=1_030.0) == 0


async def test_a_backlog_at_one_endpoint_hides_no_other(store: JobStore) -> None:
    backlog = [_delivery(f"evt_{i}", "https://dead.test/h", at=1_000.0 + i) for i in range(20)]
    later = [_delivery("evt_late", "https://ok.test/h", at=1_050.0)]
    await store.enqueue_deliveries([*backlog, *later], cursor=21)
    due = await store.due_deliveries(now=2_000.0, limit=10, per_endpoint=4)
    assert [d.event_id for d in due] == ["evt_0", "evt_1", "evt_2", "evt_3", "evt_late"]
