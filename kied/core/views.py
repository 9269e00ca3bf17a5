"""How jobs and their events look to the application: plain JSON, the same everywhere.

The API answers with :func:`job_view`, and every event in the event log carries the job as
:func:`job_view` showed it when the event was written.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from kied.core.jobs import TERMINAL_STATES

if TYPE_CHECKING:
    from kied.core._json import JsonObject
    from kied.core.jobs import Job

__all__ = ["iso", "job_view"]


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC time with milliseconds (``…Z``), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(job: Job) -> JsonObject:
    """The application's view of a job."""
    error: JsonObject | None = None
    if job.error_code is not None or job.error_message is not None:
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": job.id,
        "state": job.state.value,
        "terminal": job.state in TERMINAL_STATES,
        "family": job.family,
        "model": job.model,
        "task_id": job.task_id,
        "kie_state": job.kie_state,
        "result_urls": list(job.result_urls),
        "files": [
            {
                "url": f.url,
                "kie_url": f.kie_url,
                "sha256": f.sha256,
                "size": f.size,
                "content_type": f.content_type,
                "archived_at": iso(f.archived_at),
            }
            for f in job.files
        ],
        "archive": None
        if job.archive_state is None
        else {"state": job.archive_state.value, "attempts": job.archive_attempts},
        "error": error,
        "ended_by": job.ended_by.value if job.ended_by is not None else None,
        "late": job.late,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "deadline_at": iso(job.deadline_at),
        "ended_at": iso(job.ended_at),
        "last_error": job.last_error,
        "submission": {
            "count": job.submit_count,
            "last_sent_at": iso(job.submit_sent_at),
            "in_flight": job.submission_in_flight,
            "callback_url": job.submit_callback_url,
        },
        "other_task_ids": list(job.other_task_ids),
        "webhook": None if job.request is None else job.request.get("webhook"),
        "metadata": job.metadata,
        "idempotency_key": job.idempotency_key,
    }
