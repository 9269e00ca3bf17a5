"""The callback intake: parse, authenticate, record, apply, wake.

The HTTP layer hands every request to :meth:`CallbackIntake.handle` and answers 200
whatever happens here; this module makes sure what was sent is recorded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

import trio

from kied.core.auth import REPLAYED, AuthVerdict, check_callback_auth
from kied.core.callbacks import CallbackOutcome, Outcome, ParseLimits, Unrecognised, parse_callback
from kied.core.inputs import visible
from kied.core.jobs import TERMINAL_STATES, EndedBy, JobId, Report, TaskId
from kied.core.outcomes import outcome_report
from kied.errors import StoreUnavailableError
from kied.journal import JournalFullError, new_journal_id
from kied.store import CallbackEffect, CallbackRecord, InboxEntry, JobStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from kied.changes import JobChanges
    from kied.journal import CallbackJournal
    from kied.metrics import Metrics
    from kied.settings import Settings

__all__ = ["CallbackIntake", "RawCallback", "Receipt", "redact_headers", "report_for"]

logger = logging.getLogger(__name__)

_TOKEN_HEADER = "x-kie-callback-token"
_SECRET_PARAMS = frozenset({"token"})
#: what a callback's write may have changed, for whoever waits on the job: its state, or
#: a request to confirm its task's status (the leader's poller acts on it)
_TOLD_EFFECTS = frozenset({CallbackEffect.CHANGED, CallbackEffect.CONFIRMING})
#: Headers never stored as sent: their names are kept, their values shown as ``***``.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_SECRET_WORDS = ("token", "secret", "signature", "key", "auth", "cookie", "password")
#: Bounds on the headers kept with a callback: how many, and each value's length.
_MAX_HEADERS = 64
_MAX_HEADER_VALUE = 256
#: How much of an unauthenticated callback's body is kept (its size and hash are kept too).
REJECTED_BODY_KEPT = 1024
#: How long a callback waits for storage before it is kept in the journal instead.
CALLBACK_STORE_WAIT_S = 3.0
#: Drops are logged at most this often.
_DROP_LOG_S = 60.0


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
    #: sha256 of the whole body as sent (hex); from ``body`` when not given
    body_sha256: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """What became of a callback: stored, kept in the journal, or dropped."""

    record: CallbackRecord | None = None  # stored in the database
    journal_id: str | None = None  # kept in the journal until storage answers again
    dropped: str | None = None  # why it was kept nowhere: a ``kied_callbacks_dropped`` reason


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
        journal: CallbackJournal | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._now = now
        self._metrics = metrics
        self._changes = changes
        self._on_callback = on_callback
        self._limits = ParseLimits(max_bytes=settings.max_callback_bytes)
        self._journal = journal
        self._rejected = _Budget(settings.rejected_per_minute)
        self._dropped_since_log = 0
        self._drop_logged_at: float | None = None

    async def handle(self, raw: RawCallback) -> Receipt:
        """Parse, authenticate and store one callback, and apply it to its job.

        An unauthenticated callback is kept as its size, hash, headers and first
        :data:`REJECTED_BODY_KEPT` bytes, at most ``rejected_per_minute`` a minute. While
        storage is down, a callback goes to the journal, to be stored when it answers.

        Returns:
            What became of it.

        Raises:
            StoreError: the callback could not be stored, nor kept in a journal (the
                caller still answers 200).

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
        # Kept whatever it holds: what no text column takes is written as visible escapes.
        job_param = visible(query.get("job", "").strip())
        if not verdict.authenticated and not self._rejected.take(trio.current_time()):
            self._drop("rejected_budget", "more unauthenticated callbacks than allowed a minute")
            return Receipt(dropped="rejected_budget")
        body_sha256 = raw.body_sha256 or hashlib.sha256(raw.body).hexdigest()
        entry = InboxEntry(
            received_at=received_at,
            body=raw.body if verdict.authenticated else raw.body[:REJECTED_BODY_KEPT],
            body_size=raw.body_size,
            body_sha256=body_sha256,
            headers=redact_headers(raw.headers),
            journal_id=new_journal_id(),
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
        report = report_for(parsed)
        journal = self._journal
        if journal is not None and journal.waiting:
            # Storage was down and entries wait for it: this one follows them.
            return await self._keep(journal, entry, report)
        if journal is None:
            record, entry, verdict = await self._write(entry, verdict, report)
        else:
            # Written or not, the journal's entry is stored once: it carries the same
            # journal_id, and storage keeps one row per journal_id. So storage that does
            # not answer in time is as good as down: KIE waits 15 s for its 200.
            problem = f"no answer within {CALLBACK_STORE_WAIT_S:g} s"
            written = None
            with trio.move_on_after(CALLBACK_STORE_WAIT_S):
                try:
                    written = await self._write(entry, verdict, report)
                except StoreUnavailableError as exc:
                    problem = str(exc)
            if written is None:
                logger.warning(
                    "[KIE_CALLBACK] storage unavailable, callback kept in the journal: %s",
                    problem,
                    extra={"action": "callback_journaled"},
                )
                return await self._keep(journal, entry, report)
            record, entry, verdict = written
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
        return Receipt(record=record)

    async def _write(
        self, entry: InboxEntry, verdict: AuthVerdict, report: Report | None
    ) -> tuple[CallbackRecord, InboxEntry, AuthVerdict]:
        """Store ``entry``; a valid signature seen before makes it a rejected replay.

        Returns:
            What storing it did, and the entry and verdict as stored.
        """
        store = await self._store()
        if verdict.signature_digest is not None and not await store.remember_signature(
            verdict.signature_digest, seen_at=entry.received_at
        ):
            # A valid signature is accepted once: a second callback carrying it, whatever
            # its body, is a replay.
            verdict = AuthVerdict(authenticated=False, detail=REPLAYED)
            entry = replace(
                entry,
                body=entry.body[:REJECTED_BODY_KEPT],
                authenticated=False,
                auth=REPLAYED,
            )
        return await store.record_callback(entry, report), entry, verdict

    async def _keep(
        self, journal: CallbackJournal, entry: InboxEntry, report: Report | None
    ) -> Receipt:
        try:
            await journal.append(entry, report)
        except JournalFullError as exc:
            self._drop("journal_full", str(exc))
            return Receipt(dropped="journal_full")
        except OSError as exc:
            self._drop("journal_error", f"the journal cannot be written: {exc}")
            return Receipt(dropped="journal_error")
        self._metrics.callback_journaled()
        return Receipt(journal_id=entry.journal_id)

    def _drop(self, reason: str, why: str) -> None:
        """Count a callback kept nowhere; log it, at most once a minute."""
        self._metrics.callback_dropped(reason)
        self._dropped_since_log += 1
        now = trio.current_time()
        if self._drop_logged_at is not None and now - self._drop_logged_at < _DROP_LOG_S:
            return
        logger.error(
            "[KIE_CALLBACK] %d callback(s) answered 200 but not kept: %s (%s)",
            self._dropped_since_log,
            why,
            reason,
            extra={"action": "callback_dropped", "reason": reason},
        )
        self._dropped_since_log = 0
        self._drop_logged_at = now

    async def replay(self, journal: CallbackJournal, store: JobStore) -> int:
        """Write the journal's entries to ``store``; how many.

        Raises:
            StoreUnavailableError: storage went down again; the rest waits.
        """

        async def record(entry: InboxEntry, report: Report | None) -> None:
            stored = await store.record_callback(entry, report)
            self._metrics.callback_recorded(
                outcome=entry.outcome, auth=entry.auth, effect=stored.effect.value
            )
            if stored.effect is CallbackEffect.CHANGED and stored.job is not None:
                job = stored.job
                self._changes.wrote(job, ended=job.state in TERMINAL_STATES)
            if entry.authenticated:
                self._on_callback(True)

        replayed = await journal.replay(record)
        if replayed:
            self._metrics.journal_replayed(replayed)
            logger.info(
                "[KIE_CALLBACK] %d callback(s) from the journal stored",
                replayed,
                extra={"action": "journal_replayed", "count": replayed},
            )
        return replayed


class _Budget:
    """A token bucket: ``per_minute`` at once, refilled at ``per_minute`` a minute."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._tokens = float(per_minute)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(
                float(self._per_minute), self._tokens + (now - self._at) * self._per_minute / 60
            )
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` as kept with a callback: secrets as ``***``, each value bounded."""
    kept: dict[str, str] = {}
    for name, value in list(headers.items())[:_MAX_HEADERS]:
        lower = name.lower()
        if lower in _SECRET_HEADERS or any(word in lower for word in _SECRET_WORDS):
            kept[lower] = "***"
        elif len(value) > _MAX_HEADER_VALUE:
            kept[lower] = value[:_MAX_HEADER_VALUE] + "…"
        else:
            kept[lower] = value
    return kept


def _redact(query_string: str) -> str:
    pairs = parse_qsl(query_string, keep_blank_values=True)
    return urlencode([(k, "***" if k in _SECRET_PARAMS else v) for k, v in pairs])
