"""The in-memory store: :class:`MemoryStore`, with exactly the database stores' semantics.

It is the store of tests that run on the autojump clock (no thread, no socket), and is
re-exported by :mod:`kied.testing`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from kied.core.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ArchivedFile,
    ArchiveState,
    EndedBy,
    EventKind,
    EventType,
    Job,
    JobId,
    JobState,
    NewJob,
    Report,
    TaskId,
    event_type,
    is_late,
    sources,
    target,
)
from kied.core.views import job_view
from kied.errors import ConflictError, StoreUnavailableError
from kied.store._base import (
    ArchiveMode,
    Attached,
    CallbackEffect,
    CallbackHistory,
    CallbackRecord,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Event,
    InboxEntry,
    JobStore,
    ListeningSpan,
    NewDelivery,
    Prunable,
    PruneKind,
    StoredCallback,
)
from kied.store._common import (
    CONFIRMABLE_STATES,
    MAX_OTHER_TASKS,
    check_limit,
    confirms_only,
    match_callback,
    metadata_matches,
    new_event_id,
)
from kied.store._listening import history_of, spans_of

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

    from kied.core._json import JsonObject, JsonValue

__all__ = ["MemoryStore"]

_OUTCOME_EVENTS = frozenset({EventKind.SUCCEEDED, EventKind.FAILED})
_FINISHED_BY = frozenset({EndedBy.CALLBACK, EndedBy.CALLBACK_CONFIRMED, EndedBy.POLL})


def _json_copy(value: JsonValue) -> JsonValue:
    # What a database would keep: a detached copy, and a TypeError for what JSON cannot hold.
    return None if value is None else json.loads(json.dumps(value))


def _object_copy(value: JsonObject | None) -> JsonObject | None:
    if value is None:
        return None
    copied: JsonObject = json.loads(json.dumps(value))
    return copied


def _detached(job: Job) -> Job:
    return replace(
        job,
        request=_object_copy(job.request),
        metadata=_object_copy(job.metadata),
        result=_json_copy(job.result),
    )


def _applied(job: Job, report: Report, now: float) -> Job | None:
    """The job after ``report``, or ``None`` when the compare-and-set would not match."""
    event = report.event
    if job.state not in sources(event):
        return None
    state = target(event)
    kie_state = job.kie_state if report.kie_state is None else report.kie_state
    if state not in TERMINAL_STATES:
        return replace(job, state=state, updated_at=now, kie_state=kie_state)
    ended = replace(
        job,
        state=state,
        updated_at=now,
        kie_state=kie_state,
        ended_by=report.source,
        ended_at=now,
        late=job.late or is_late(job.state, event),
    )
    if event is EventKind.SUCCEEDED:
        return replace(
            ended,
            result_urls=tuple(report.result_urls),
            result=_json_copy(report.result),
            error_code=None,
            error_message=None,
        )
    if event is EventKind.FAILED:
        return replace(ended, error_code=report.error_code, error_message=report.error_message)
    return replace(
        ended,
        error_code=job.error_code if report.error_code is None else report.error_code,
        error_message=job.error_message if report.error_message is None else report.error_message,
    )


@dataclass(slots=True, kw_only=True)
class _InboxRow:
    id: int
    entry: InboxEntry
    report: Report | None
    effect: CallbackEffect
    matched_job_id: JobId | None


class MemoryStore(JobStore):
    """:class:`~kied.store.JobStore` in memory.

    Every operation checkpoints once, then runs to its end without yielding, so it is
    atomic with respect to other trio tasks, like a transaction. Nothing survives the
    object. After :meth:`aclose` every operation raises ``StoreUnavailableError``.
    """

    def __init__(self) -> None:
        self._jobs: dict[JobId, Job] = {}  # in creation order
        self._by_key: dict[str, JobId] = {}
        self._by_task: dict[TaskId, JobId] = {}
        self._inbox: list[_InboxRow] = []
        self._last_inbox_id = 0  # ids are never reused, as a database's are not
        self._journaled: dict[str, _InboxRow] = {}
        self._events: list[Event] = []
        self._cursor = 0
        self._deliveries: dict[int, Delivery] = {}
        self._last_delivery_id = 0
        self._attempts: list[DeliveryAttempt] = []
        self._webhook_cursor = 0
        self._disabled: dict[str, str] = {}
        self._signatures: dict[str, float] = {}
        self._archive_mode: ArchiveMode = "off"
        self._trash: dict[JobId, list[str]] = {}
        #: listening spans by instance: (since, until)
        self._listening: dict[str, tuple[float, float]] = {}
        self._closed = False

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StoreUnavailableError("the store is closed")

    def _find(self, job_id: JobId | None) -> Job | None:
        return None if job_id is None else self._jobs.get(job_id)

    def _set(self, job: Job) -> Job:
        self._jobs[job.id] = job
        if job.task_id is not None:
            self._by_task[job.task_id] = job.id
        return _detached(job)

    def _apply(self, job_id: JobId, report: Report, now: float) -> Job | None:
        job = self._jobs.get(job_id)
        changed = None if job is None else _applied(job, report, now)
        if changed is None:
            return None
        kind = event_type(report.event, changed)
        if (
            report.event is EventKind.SUCCEEDED
            and self._archive_mode != "off"
            and changed.result_urls
        ):
            owed = kind if self._archive_mode == "notify-after" else None
            changed = replace(
                changed,
                archive_state=ArchiveState.PENDING,
                archive_attempts=0,
                archive_next_at=now,
                archive_owed_event=owed,
            )
        if kind is not None and changed.archive_owed_event is None:
            self._append_event(kind, changed, now)
        return self._set(changed)

    def _end_archive(self, job_id: JobId, after: Job, now: float) -> Job:
        before = self._jobs[job_id]
        if after.archive_state is not ArchiveState.PENDING:
            after = replace(after, archive_owed_event=None)
            if before.archive_owed_event is not None:
                self._append_event(before.archive_owed_event, after, now)
            if after.archive_state is ArchiveState.ARCHIVED:
                self._append_event(EventType.ARCHIVED, after, now)
        return self._set(after)

    def _pending_archive(self, job_id: JobId) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.archive_state is not ArchiveState.PENDING:
            return None
        return job

    def _append_event(self, kind: EventType, job: Job, now: float) -> None:
        self._cursor += 1
        self._events.append(
            Event(
                cursor=self._cursor,
                id=new_event_id(),
                type=kind.value,
                created_at=now,
                job_id=job.id,
                job=json.loads(json.dumps(job_view(job))),
            )
        )

    def _apply_waiting_callback(self, job_id: JobId, task_id: TaskId, now: float) -> None:
        for row in reversed(self._inbox):
            if (
                row.entry.task_id == task_id
                and row.entry.authenticated
                and row.effect is CallbackEffect.NO_JOB
                and row.entry.outcome in ("success", "fail")
                and row.report is not None
                and row.report.event in _OUTCOME_EVENTS
            ):
                row.matched_job_id = job_id
                if confirms_only(row.entry.auth):
                    row.effect = self._request_confirm(job_id, now)
                    return
                report = replace(row.report, source=EndedBy.CALLBACK)
                changed = self._apply(job_id, report, now)
                row.effect = CallbackEffect.NO_OP if changed is None else CallbackEffect.CHANGED
                return

    def _request_confirm(self, job_id: JobId, now: float) -> CallbackEffect:
        """Ask the leader to confirm the task's status; ``CONFIRMING``, or ``NO_OP`` when
        nothing KIE says can change the job any more."""
        job = self._jobs[job_id]
        if job.state not in CONFIRMABLE_STATES:
            return CallbackEffect.NO_OP
        if job.confirm_requested_at is None or job.confirm_requested_at < now:
            self._set(replace(job, confirm_requested_at=now))
        return CallbackEffect.CONFIRMING

    async def ping(self) -> None:
        await self._enter()

    async def create_job(self, new: NewJob) -> tuple[Job, bool]:
        await self._enter()
        existing = self._jobs.get(new.id)
        if existing is None and new.idempotency_key is not None:
            existing = self._find(self._by_key.get(new.idempotency_key))
        if existing is None and new.task_id is not None:
            existing = self._find(self._by_task.get(new.task_id))
        if existing is not None:
            return _detached(existing), False
        job = Job(
            id=new.id,
            family=new.family,
            model=new.model,
            task_id=new.task_id,
            state=JobState.SUBMITTING if new.task_id is None else JobState.PENDING,
            request=_object_copy(new.request),
            metadata=_object_copy(new.metadata),
            idempotency_key=new.idempotency_key,
            created_at=new.created_at,
            updated_at=new.created_at,
            deadline_at=new.deadline_at,
        )
        self._set(job)
        self._append_event(EventType.CREATED, job, new.created_at)
        if new.idempotency_key is not None:
            self._by_key[new.idempotency_key] = job.id
        if new.task_id is not None:
            self._apply_waiting_callback(job.id, new.task_id, new.created_at)
        return _detached(self._jobs[job.id]), True

    async def get_job(self, job_id: JobId) -> Job | None:
        await self._enter()
        job = self._jobs.get(job_id)
        return None if job is None else _detached(job)

    async def get_job_by_task(self, task_id: TaskId) -> Job | None:
        await self._enter()
        job_id = self._by_task.get(task_id)
        return None if job_id is None else _detached(self._jobs[job_id])

    async def list_jobs(
        self,
        *,
        states: Collection[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
    ) -> list[Job]:
        await self._enter()
        check_limit(limit)
        wanted = None if states is None else {str(s) for s in states}
        if metadata:
            return [
                j
                for j in await self.list_jobs(states=states, limit=len(self._jobs))
                if all(metadata_matches(j.metadata, k, v) for k, v in metadata.items())
            ][:limit]
        # Newest first: by creation time, ties broken by the later insert.
        jobs = sorted(
            enumerate(self._jobs.values()),
            key=lambda pair: (pair[1].created_at, pair[0]),
            reverse=True,
        )
        found = [j for _, j in jobs if wanted is None or j.state.value in wanted]
        return [_detached(j) for j in found[:limit]]

    async def unfinished_jobs(self) -> list[Job]:
        await self._enter()
        jobs = sorted(
            enumerate(self._jobs.values()),
            key=lambda pair: (pair[1].deadline_at, pair[1].created_at, pair[0]),
        )
        return [_detached(j) for _, j in jobs if j.state in ACTIVE_STATES]

    async def attach_task(self, job_id: JobId, task_id: TaskId, *, now: float) -> Attached | None:
        await self._enter()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.task_id is not None and job.task_id != task_id:
            # createTask answered after the job adopted another task: kept, not applied
            self._keep_other_task(job, task_id, now)
            return Attached(job=_detached(self._jobs[job_id]), ended=False)
        newly_attached = job.task_id is None
        if newly_attached:
            other = self._by_task.get(task_id)
            if other is not None:
                raise ConflictError(f"task {task_id} is already tracked by job {other}")
            self._set(replace(job, task_id=task_id, updated_at=now))
        self._apply(job_id, Report(event=EventKind.ACCEPTED, source=EndedBy.SUBMIT), now)
        if newly_attached:
            self._append_event(EventType.SUBMITTED, self._jobs[job_id], now)
            self._apply_waiting_callback(job_id, task_id, now)
        after = _detached(self._jobs[job_id])
        return Attached(job=after, ended=after.terminal and not job.terminal)

    async def begin_submission(
        self, job_id: JobId, *, count: int, callback_url: str | None, now: float
    ) -> Job | None:
        await self._enter()
        job = self._jobs.get(job_id)
        if (
            job is None
            or job.state is not JobState.SUBMITTING
            or job.task_id is not None
            or job.submit_count != count
        ):
            return None
        deadline_at = job.deadline_at
        if job.submit_count == 0 and now > job.created_at:
            deadline_at += now - job.created_at  # the wait in kied's queue is not counted
        return self._set(
            replace(
                job,
                submit_sent_at=now,
                submit_count=count + 1,
                submit_callback_url=callback_url,
                updated_at=now,
                deadline_at=deadline_at,
            )
        )

    async def end_submission(self, job_id: JobId, *, count: int, now: float) -> None:
        await self._enter()
        job = self._jobs.get(job_id)
        if job is not None and job.task_id is None and job.submit_count == count:
            self._set(replace(job, submit_sent_at=None, updated_at=now))

    def _keep_other_task(self, job: Job, task_id: TaskId | None, now: float) -> None:
        if (
            task_id is not None
            and task_id != job.task_id
            and task_id not in job.other_task_ids
            and len(job.other_task_ids) < MAX_OTHER_TASKS
        ):
            self._set(replace(job, other_task_ids=(*job.other_task_ids, task_id), updated_at=now))

    async def apply(self, job_id: JobId, report: Report, *, now: float) -> Job | None:
        await self._enter()
        return self._apply(job_id, report, now)

    async def note_error(self, job_id: JobId, message: str, *, now: float) -> None:
        await self._enter()
        job = self._jobs.get(job_id)
        if job is not None:
            self._set(replace(job, last_error=message, updated_at=now))

    async def record_callback(self, entry: InboxEntry, report: Report | None) -> CallbackRecord:
        await self._enter()
        stored = None if entry.journal_id is None else self._journaled.get(entry.journal_id)
        if stored is not None:  # stored before: the same row, nothing applied again
            job = self._find(stored.matched_job_id)
            return CallbackRecord(
                inbox_id=stored.id,
                effect=stored.effect,
                job=None if job is None else _detached(job),
            )
        if report is not None:  # first, so that a result JSON cannot hold changes nothing
            report = replace(report, result=_json_copy(report.result))
        effect, job, adopted = self._resolve_callback(entry, report)
        row = _InboxRow(
            id=self._last_inbox_id + 1,
            entry=entry,
            report=report,
            effect=effect,
            matched_job_id=None if job is None else job.id,
        )
        self._inbox.append(row)
        self._last_inbox_id = row.id
        if entry.journal_id is not None:
            self._journaled[entry.journal_id] = row
        return CallbackRecord(inbox_id=row.id, effect=effect, job=job, adopted=adopted)

    def _resolve_callback(
        self, entry: InboxEntry, report: Report | None
    ) -> tuple[CallbackEffect, Job | None, bool]:
        if not entry.authenticated:
            return CallbackEffect.REJECTED, None, False
        job = None if entry.task_id is None else self._find(self._by_task.get(entry.task_id))
        if job is None:
            job = self._find(entry.job_id)
        if report is None:
            return CallbackEffect.NOT_APPLICABLE, None if job is None else _detached(job), False
        if job is None:
            return CallbackEffect.NO_JOB, None, False
        now = entry.received_at
        refused = match_callback(job, entry.task_id)
        adopted = False
        if refused is None and job.task_id is None:
            assert entry.task_id is not None  # match_callback refuses a callback without one
            if entry.task_id in self._by_task:  # another job follows that task
                refused = CallbackEffect.OTHER_TASK
            else:
                job = replace(job, task_id=entry.task_id, updated_at=now)
                self._set(job)
                self._append_event(EventType.SUBMITTED, job, now)
                adopted = True
        if refused is not None:
            self._keep_other_task(job, entry.task_id, now)
            return refused, _detached(self._jobs[job.id]), False
        if confirms_only(entry.auth):
            return self._request_confirm(job.id, now), _detached(self._jobs[job.id]), adopted
        changed = self._apply(job.id, report, now)
        if changed is not None:
            return CallbackEffect.CHANGED, changed, adopted
        return CallbackEffect.NO_OP, _detached(self._jobs[job.id]), adopted

    async def list_callbacks(
        self, *, task_id: TaskId | None = None, job_id: JobId | None = None, limit: int = 100
    ) -> list[StoredCallback]:
        await self._enter()
        check_limit(limit)
        rows = [
            r
            for r in reversed(self._inbox)
            if (task_id is None or r.entry.task_id == task_id)
            and (job_id is None or job_id in (r.matched_job_id, r.entry.job_id))
        ]
        return [
            StoredCallback(id=r.id, entry=r.entry, effect=r.effect, matched_job_id=r.matched_job_id)
            for r in rows[:limit]
        ]

    async def remember_signature(self, digest: str, *, seen_at: float) -> bool:
        await self._enter()
        if digest in self._signatures:
            return False
        self._signatures[digest] = seen_at
        return True

    async def prune_signatures(self, *, before: float, limit: int) -> int:
        await self._enter()
        check_limit(limit)
        old = sorted((at, d) for d, at in self._signatures.items() if at < before)[:limit]
        for _, digest in old:
            del self._signatures[digest]
        return len(old)

    async def list_events(self, *, after: int = 0, limit: int = 100) -> list[Event]:
        await self._enter()
        check_limit(limit)
        return [e for e in self._events if e.cursor > after][:limit]

    async def prune_events(self, *, before: float, limit: int) -> int:
        await self._enter()
        check_limit(limit)
        old = {e.cursor for e in self._events if e.created_at < before}
        doomed = set(sorted(old)[:limit])
        self._events = [e for e in self._events if e.cursor not in doomed]
        return len(doomed)

    def _prunable_jobs(self, before: float) -> list[Job]:
        return sorted(
            (
                j
                for j in self._jobs.values()
                if j.ended_at is not None and j.ended_at < before and j.state in TERMINAL_STATES
            ),
            key=lambda j: j.ended_at or 0.0,
        )

    def _prunable_deliveries(self, before: float) -> list[Delivery]:
        return sorted(
            (
                d
                for d in self._deliveries.values()
                if d.created_at < before and d.state is not DeliveryState.PENDING
            ),
            key=lambda d: (d.created_at, d.id),
        )

    def _prunable_inbox(self, before: float) -> list[_InboxRow]:
        return sorted(
            (r for r in self._inbox if r.entry.received_at < before),
            key=lambda r: (r.entry.received_at, r.id),
        )

    async def prune_jobs(self, *, before: float, limit: int) -> list[JobId]:
        await self._enter()
        check_limit(limit)
        doomed = [j.id for j in self._prunable_jobs(before)[:limit]]
        for job_id in doomed:
            job = self._jobs.pop(job_id)
            if job.task_id is not None:
                self._by_task.pop(job.task_id, None)
            if job.idempotency_key is not None:
                self._by_key.pop(job.idempotency_key, None)
            if job.files:
                self._trash.setdefault(job_id, [f.key for f in job.files])
        gone = set(doomed)
        for row in self._inbox:
            if row.matched_job_id in gone:
                row.matched_job_id = None
        return doomed

    async def prune_deliveries(self, *, before: float, limit: int) -> int:
        await self._enter()
        check_limit(limit)
        doomed = {d.id for d in self._prunable_deliveries(before)[:limit]}
        for delivery_id in doomed:
            del self._deliveries[delivery_id]
        self._attempts = [a for a in self._attempts if a.delivery_id not in doomed]
        return len(doomed)

    async def prune_inbox(self, *, before: float, limit: int) -> int:
        await self._enter()
        check_limit(limit)
        doomed = {r.id for r in self._prunable_inbox(before)[:limit]}
        self._inbox = [r for r in self._inbox if r.id not in doomed]
        return len(doomed)

    async def count_prunable(self, kind: PruneKind, *, before: float) -> Prunable:
        await self._enter()
        times: list[float]
        if kind is PruneKind.JOBS:
            times = [j.ended_at or 0.0 for j in self._prunable_jobs(before)]
        elif kind is PruneKind.DELIVERIES:
            times = [d.created_at for d in self._prunable_deliveries(before)]
        elif kind is PruneKind.INBOX:
            times = [r.entry.received_at for r in self._prunable_inbox(before)]
        elif kind is PruneKind.EVENTS:
            times = [e.created_at for e in self._events if e.created_at < before]
        else:
            times = [at for at in self._signatures.values() if at < before]
        return Prunable(count=len(times), oldest=min(times, default=None))

    async def enqueue_deliveries(self, deliveries: Sequence[NewDelivery], *, cursor: int) -> int:
        await self._enter()
        known = {(d.event_id, d.endpoint) for d in self._deliveries.values()}
        added = 0
        for new in deliveries:
            if (new.event_id, new.endpoint) in known:
                continue
            known.add((new.event_id, new.endpoint))
            self._last_delivery_id += 1
            delivery_id = self._last_delivery_id
            self._deliveries[delivery_id] = Delivery(
                id=delivery_id,
                event_id=new.event_id,
                event_cursor=new.event_cursor,
                job_id=new.job_id,
                type=new.type,
                endpoint=new.endpoint,
                body=new.body,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=new.created_at,
                created_at=new.created_at,
                updated_at=new.created_at,
                last_status=None,
                last_error=None,
                delivered_at=None,
            )
            added += 1
        self._webhook_cursor = max(self._webhook_cursor, cursor)
        return added

    async def webhook_cursor(self) -> int:
        await self._enter()
        return self._webhook_cursor

    def _pending(self) -> list[Delivery]:
        return [d for d in self._deliveries.values() if d.state is DeliveryState.PENDING]

    async def due_deliveries(
        self, *, now: float, limit: int, per_endpoint: int = 100
    ) -> list[Delivery]:
        await self._enter()
        due = sorted(
            (
                d
                for d in self._pending()
                if d.next_attempt_at is not None and d.next_attempt_at <= now
            ),
            key=lambda d: (d.next_attempt_at or 0.0, d.id),
        )
        taken: dict[str, int] = {}
        chosen = []
        for d in due:
            taken[d.endpoint] = taken.get(d.endpoint, 0) + 1
            if taken[d.endpoint] <= per_endpoint:
                chosen.append(d)
        return chosen[:limit]

    async def next_delivery_at(self) -> float | None:
        await self._enter()
        times = [d.next_attempt_at for d in self._pending() if d.next_attempt_at is not None]
        return min(times, default=None)

    async def record_attempt(
        self, attempt: DeliveryAttempt, *, state: DeliveryState, next_attempt_at: float | None
    ) -> None:
        await self._enter()
        self._attempts.append(attempt)
        delivery = self._deliveries.get(attempt.delivery_id)
        if delivery is None or delivery.state is not DeliveryState.PENDING:
            return
        self._deliveries[delivery.id] = replace(
            delivery,
            attempts=delivery.attempts + 1,
            state=state,
            next_attempt_at=next_attempt_at,
            updated_at=attempt.attempted_at,
            last_status=attempt.status_code,
            last_error=attempt.error,
            delivered_at=(
                attempt.attempted_at if state is DeliveryState.DELIVERED else delivery.delivered_at
            ),
        )

    async def list_deliveries(
        self,
        *,
        state: DeliveryState | None = None,
        event_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Delivery]:
        await self._enter()
        found = [
            d
            for d in reversed(self._deliveries.values())
            if (state is None or d.state is state)
            and (event_id is None or d.event_id == event_id)
            and (since is None or d.created_at >= since)
        ]
        return found[:limit]

    async def list_attempts(self, delivery_id: int) -> list[DeliveryAttempt]:
        await self._enter()
        return [a for a in self._attempts if a.delivery_id == delivery_id]

    async def redeliver(
        self, *, event_id: str | None = None, failed_since: float | None = None, now: float
    ) -> int:
        await self._enter()
        chosen = [
            d
            for d in self._deliveries.values()
            if (event_id is not None and d.event_id == event_id)
            or (
                failed_since is not None
                and d.state is DeliveryState.FAILED
                and d.created_at >= failed_since
            )
        ]
        for d in chosen:
            self._disabled.pop(d.endpoint, None)
            self._deliveries[d.id] = replace(
                d, state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, updated_at=now
            )
        return len(chosen)

    async def disable_endpoint(self, endpoint: str, *, reason: str, now: float) -> int:
        await self._enter()
        self._disabled[endpoint] = reason
        failed = [d for d in self._pending() if d.endpoint == endpoint]
        for d in failed:
            self._deliveries[d.id] = replace(
                d,
                state=DeliveryState.FAILED,
                next_attempt_at=None,
                updated_at=now,
                last_error=reason,
            )
        return len(failed)

    async def disabled_endpoints(self) -> dict[str, str]:
        await self._enter()
        return dict(self._disabled)

    async def set_archive_mode(self, mode: ArchiveMode) -> None:
        await self._enter()
        self._archive_mode = mode

    async def due_archives(self, *, now: float, limit: int) -> list[Job]:
        await self._enter()
        check_limit(limit)
        due = [
            j
            for j in self._jobs.values()
            if j.archive_state is ArchiveState.PENDING
            and j.archive_next_at is not None
            and j.archive_next_at <= now
        ]
        due.sort(key=lambda j: j.archive_next_at or 0.0)
        return [_detached(j) for j in due[:limit]]

    async def next_archive_at(self) -> float | None:
        await self._enter()
        times = [
            j.archive_next_at
            for j in self._jobs.values()
            if j.archive_state is ArchiveState.PENDING and j.archive_next_at is not None
        ]
        return min(times, default=None)

    async def pending_archives(self) -> int:
        await self._enter()
        return sum(1 for j in self._jobs.values() if j.archive_state is ArchiveState.PENDING)

    async def finish_archive(
        self, job_id: JobId, files: Sequence[ArchivedFile], *, now: float
    ) -> Job | None:
        await self._enter()
        job = self._pending_archive(job_id)
        if job is None:
            return None
        after = replace(
            job,
            archive_state=ArchiveState.ARCHIVED,
            files=tuple(files),
            archive_next_at=None,
            last_error=None,
            updated_at=now,
        )
        return self._end_archive(job_id, after, now)

    async def fail_archive(
        self, job_id: JobId, error: str, *, next_at: float | None, now: float
    ) -> Job | None:
        await self._enter()
        job = self._pending_archive(job_id)
        if job is None:
            return None
        after = replace(
            job,
            archive_attempts=job.archive_attempts + 1,
            last_error=error,
            archive_next_at=next_at,
            archive_state=ArchiveState.FAILED if next_at is None else ArchiveState.PENDING,
            updated_at=now,
        )
        return self._end_archive(job_id, after, now)

    async def retry_archives(self, job_ids: Collection[JobId] | None, *, now: float) -> list[JobId]:
        await self._enter()
        if job_ids is None:
            chosen = [j for j in self._jobs.values() if j.archive_state is ArchiveState.FAILED]
        else:
            chosen = [
                j
                for j in (self._jobs.get(i) for i in job_ids)
                if j is not None
                and j.state is JobState.SUCCEEDED
                and j.result_urls
                and j.archive_state is not ArchiveState.PENDING
            ]
        for job in chosen:
            self._set(
                replace(
                    job,
                    archive_state=ArchiveState.PENDING,
                    archive_attempts=0,
                    archive_next_at=now,
                    updated_at=now,
                )
            )
        return [j.id for j in chosen]

    async def archive_trash(self, *, limit: int) -> list[tuple[JobId, list[str]]]:
        await self._enter()
        check_limit(limit)
        return [(i, list(keys)) for i, keys in sorted(self._trash.items())[:limit]]

    async def forget_archive_trash(self, job_ids: Collection[JobId]) -> None:
        await self._enter()
        for job_id in job_ids:
            self._trash.pop(job_id, None)

    async def heard_listening(self, instance: str, *, since: float, now: float) -> None:
        await self._enter()
        self._listening[instance] = (since, now)

    async def listening_spans(self, *, after: float) -> list[ListeningSpan]:
        await self._enter()
        rows = [(name, f"{since!r} {until!r}") for name, (since, until) in self._listening.items()]
        kept, stale = spans_of(rows, after=after)
        for name in stale:
            del self._listening[name]
        return kept

    async def callback_history(self, *, limit: int) -> CallbackHistory:
        await self._enter()
        check_limit(limit)
        last = max(
            (row.entry.received_at for row in self._inbox if row.entry.authenticated),
            default=None,
        )
        ended = [
            job
            for job in self._jobs.values()
            if job.ended_at is not None and job.ended_by in _FINISHED_BY
        ]
        ended.sort(key=lambda job: job.ended_at or 0.0, reverse=True)
        rows = [
            (j.family, j.model, j.ended_by and j.ended_by.value, j.created_at, j.ended_at)
            for j in ended[:limit]
        ]
        return history_of(last, rows)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
