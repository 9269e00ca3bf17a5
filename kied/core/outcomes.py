"""From what KIE said (by callback or by status query) to a job report."""

from __future__ import annotations

from kied.core._extract import Outcome
from kied.core.jobs import EndedBy, EventKind, Report

__all__ = ["outcome_report"]

_EVENTS = {
    Outcome.SUCCESS: EventKind.SUCCEEDED,
    Outcome.FAIL: EventKind.FAILED,
    Outcome.PENDING: EventKind.PROGRESS,
}


def outcome_report(
    outcome: Outcome,
    *,
    source: EndedBy,
    kie_state: str | None,
    result_urls: tuple[str, ...],
    error_code: str | None,
    error_message: str | None,
) -> Report | None:
    """The report for a KIE outcome; ``None`` when the outcome is unknown."""
    event = _EVENTS.get(outcome)
    if event is None:
        return None
    if event is EventKind.SUCCEEDED:
        return Report(event=event, source=source, kie_state=kie_state, result_urls=result_urls)
    if event is EventKind.FAILED:
        return Report(
            event=event,
            source=source,
            kie_state=kie_state,
            error_code=error_code,
            error_message=error_message,
        )
    return Report(event=event, source=source, kie_state=kie_state)
