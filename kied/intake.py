"""The callback intake: parse, authenticate, record, apply, wake.

The HTTP layer hands every request to :meth:`CallbackIntake.handle` and answers 200
whatever happens here; this module makes sure what was sent is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from kied.core.auth import REPLAYED, AuthVerdict, check_callback_auth
from kied.core.callbacks import CallbackOutcome, Outcome, ParseLimits, Unrecognised, parse_callback
from kied.core.inputs import visible
from kied.core.jobs import TERMINAL_STATES, EndedBy, JobId, Report, TaskId
from kied.core.outcomes import outcome_report
from kied.store import CallbackEffect, CallbackRecord, InboxEntry, JobStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from kied.changes import JobChanges
    from kied.metrics import Metrics
    from kied.settings import Settings

__all__ = ["CallbackIntake", "RawCallback", "report_for"]

logger = logging.getLogger(__name__)

_TOKEN_HEADER = "x-kie-callback-token"
_SECRET_PARAMS = frozenset({"token"})
#: what a callback's write may have changed, for whoever waits on the job: its state, or
#: a request to confirm its task's status (the leader's poller acts on it)
_TOLD_EFFECTS = frozenset({CallbackEffect.CHANGED, CallbackEffect.CONFIRMING})


@dataclass(frozen=True, slots=True, kw_only=True)
class RawCallback:
    """A callback request as the HTTP layer read it."""

    body: bytes  # what was kept: the whole body, or its head when oversized
    body_size: int
    oversized: bool
    query_string: str
    headers: Mapping[str, str]  # lower-case names
    content_type: str | None
    remote: str | None


def report_for(parsed: CallbackOutcome | Unrecognised) -> Report | None:
    """What a parsed callback says about its job, or ``None`` when it says nothing usable."""
    return outcome_report(
        parsed.outcome,
        source=EndedBy.CALLBACK,
        kie_state=parsed.stage,
        result_urls=parsed.result_urls,
        error_code=parsed.error_code,
        error_message=parsed.error_message,
    )


class CallbackIntake:
    """Records every callback durably and applies the authentic ones to their jobs."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Callable[[], Awaitable[JobStore]],
        now: Callable[[], float],
        metrics: Metrics,
        changes: JobChanges,
        on_callback: Callable[[bool], None] = lambda authenticated: None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._now = now
        self._metrics = metrics
        self._changes = changes
        self._on_callback = on_callback
        self._limits = ParseLimits(max_bytes=settings.max_callback_bytes)

    async def handle(self, raw: RawCallback) -> CallbackRecord:
        """Parse, authenticate and store one callback, and apply it to its job.

        Returns:
            What storing it did.

        Raises:
            StoreError: the callback could not be stored (the caller still answers 200).

        Cancellation: the store write is one transaction; cancelled before it commits,
        nothing is written.
        """
        received_at = self._now()
        query = dict(parse_qsl(raw.query_string, keep_blank_values=True))
        parsed: CallbackOutcome | Unrecognised
        if raw.oversized:
            parsed = Unrecognised(
                reason="oversized",
                outcome=Outcome.UNKNOWN,
                result_urls=(),
                error_code=None,
                error_message=None,
                kie_code=None,
                stage=None,
            )
        else:
            parsed = parse_callback(
                raw.body,
                query=query,
                headers=raw.headers,
                content_type=raw.content_type,
                limits=self._limits,
            )
        task_id = parsed.task_id if isinstance(parsed, CallbackOutcome) else None
        given_token = query.get("token") or raw.headers.get(_TOKEN_HEADER)
        verdict = check_callback_auth(
            token=self._settings.callback_token,
            given_token=given_token,
            hmac_key=self._settings.webhook_hmac_key,
            task_id=task_id,
            timestamp=raw.headers.get("x-webhook-timestamp"),
            signature=raw.headers.get("x-webhook-signature"),
            now=received_at,
            max_skew_s=self._settings.webhook_max_skew_s,
        )
        store = await self._store()
        if verdict.signature_digest is not None and not await store.remember_signature(
            verdict.signature_digest, seen_at=received_at
        ):
            # A valid signature is accepted once: a second callback carrying it, whatever
            # its body, is a replay.
            verdict = AuthVerdict(authenticated=False, detail=REPLAYED)
        # Kept whatever it holds: what no text column takes is written as visible escapes.
        job_param = visible(query.get("job", "").strip())
        entry = InboxEntry(
            received_at=received_at,
            body=raw.body,
            body_size=raw.body_size,
            content_type=None if raw.content_type is None else visible(raw.content_type),
            query=_redact(raw.query_string),
            remote=None if raw.remote is None else visible(raw.remote),
            task_id=TaskId(task_id) if task_id else None,
            # A path through the body's keys, which may hold anything.
            found_by=visible(parsed.found_by) if isinstance(parsed, CallbackOutcome) else None,
            job_id=JobId(job_param) if job_param else None,
            outcome=parsed.outcome.value,
            problem=parsed.reason if isinstance(parsed, Unrecognised) else None,
            authenticated=verdict.authenticated,
            auth=verdict.detail,
        )
        record = await store.record_callback(entry, report_for(parsed))
        self._metrics.callback_recorded(
            outcome=parsed.outcome.value, auth=verdict.detail, effect=record.effect.value
        )
        changed = record.job if record.effect in _TOLD_EFFECTS else None
        self._on_callback(verdict.authenticated)
        logger.info(
            "[KIE_CALLBACK] task %s job %s: %s, %s (%s)",
            task_id or "-",
            record.job.id if record.job else entry.job_id or "-",
            parsed.outcome.value,
            record.effect.value,
            verdict.detail,
            extra={
                "action": "callback",
                "task_id": task_id,
                "effect": record.effect.value,
                "inbox_id": record.inbox_id,
            },
        )
        if record.adopted and record.job is not None:
            self._metrics.task_adopted()
            logger.info(
                "[GEN] job %s took task %s from its callback (createTask's answer not stored yet)",
                record.job.id,
                task_id,
                extra={"action": "task_adopted", "job_id": record.job.id, "task_id": task_id},
            )
        elif record.effect is CallbackEffect.OTHER_TASK and record.job is not None:
            self._metrics.other_task("callback")
            logger.warning(
                "[KIE_CALLBACK] inbox #%d names job %s but task %s, not the job's task %s:"
                " kept, not applied",
                record.inbox_id,
                record.job.id,
                task_id or "-",
                record.job.task_id or "-",
                extra={"action": "other_task", "job_id": record.job.id, "task_id": task_id},
            )
        if entry.problem is not None:
            logger.warning(
                "[KIE_CALLBACK] inbox #%d: %s (%d bytes)",
                record.inbox_id,
                entry.problem,
                raw.body_size,
            )
        if changed is not None:
            ended = record.effect is CallbackEffect.CHANGED and changed.state in TERMINAL_STATES
            self._changes.wrote(changed, ended=ended)
        return record


def _redact(query_string: str) -> str:
    pairs = parse_qsl(query_string, keep_blank_values=True)
    return urlencode([(k, "***" if k in _SECRET_PARAMS else v) for k, v in pairs])
