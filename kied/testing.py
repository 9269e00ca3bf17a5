"""In-process fakes for tests and development: the same contracts, no I/O.

:class:`MemoryStore` keeps jobs and the callback inbox in memory with exactly the
semantics of the database stores, so tests of everything above storage can run on the
autojump clock. ``make_new_job`` and ``make_inbox_entry`` build records with sensible
defaults.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from kied.core.jobs import JobId, NewJob, TaskId
from kied.intake import RawCallback
from kied.store import InboxEntry
from kied.store import MemoryStore as MemoryStore

if TYPE_CHECKING:
    import httpx

    from kied.core import JsonObject

__all__ = ["MemoryStore", "make_inbox_entry", "make_new_job", "raw_callback"]


def make_new_job(
    *,
    job_id: str | None = None,
    family: str = "market",
    model: str | None = "test/model",
    task_id: str | None = None,
    request: JsonObject | None = None,
    metadata: JsonObject | None = None,
    idempotency_key: str | None = None,
    created_at: float = 1_000.0,
    timeout_s: float = 900.0,
) -> NewJob:
    """A :class:`NewJob` with defaults; its deadline is ``created_at + timeout_s``."""
    return NewJob(
        id=JobId(job_id if job_id is not None else f"job-{uuid.uuid4().hex}"),
        family=family,
        model=model,
        task_id=None if task_id is None else TaskId(task_id),
        request=request,
        metadata=metadata,
        idempotency_key=idempotency_key,
        created_at=created_at,
        deadline_at=created_at + timeout_s,
    )


def make_inbox_entry(
    *,
    task_id: str | None = None,
    job_id: str | None = None,
    outcome: str = "success",
    authenticated: bool = True,
    received_at: float = 1_000.0,
    body: bytes = b"{}",
    problem: str | None = None,
) -> InboxEntry:
    """An :class:`InboxEntry` for a callback as the HTTP layer would record it."""
    return InboxEntry(
        received_at=received_at,
        body=body,
        body_size=len(body),
        content_type="application/json",
        query="" if job_id is None else f"job={job_id}",
        remote="127.0.0.1",
        task_id=None if task_id is None else TaskId(task_id),
        found_by=None if task_id is None else "data.taskId",
        job_id=None if job_id is None else JobId(job_id),
        outcome=outcome,
        problem=problem,
        authenticated=authenticated,
        auth="token" if authenticated else "missing token",
    )


async def raw_callback(request: httpx.Request) -> RawCallback:
    """A callback POSTed through an in-memory httpx transport, as kied's HTTP layer reads it.

    Lets a test or benchmark hand the simulator's callbacks straight to
    ``CallbackIntake.handle`` without a socket.
    """
    body = await request.aread()
    return RawCallback(
        body=body,
        body_size=len(body),
        oversized=False,
        query_string=request.url.query.decode("latin-1"),
        headers={name.lower(): value for name, value in request.headers.items()},
        content_type=request.headers.get("content-type"),
        remote="127.0.0.1",
    )
