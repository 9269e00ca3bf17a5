"""What the daemon counts, for ``GET /metrics`` (Prometheus text format).

One :class:`Metrics` per daemon, each with its own ``CollectorRegistry``: never the
library's global default registry, so that several daemons in one process (tests, the
demo) each report their own numbers.

Counts are taken where the thing happens, once: a callback's response code in the route,
a callback's outcome, authentication and effect where it is recorded, and a job's end
where the write that ended it was made (the callback service, the jobs service, the
pollers). A change this instance merely hears about (``Daemon.job_changed``, a
PostgreSQL notification from another instance) is never counted. Labels take a few
fixed values only: never a job or task id.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from kied import __version__
from kied.archive._policy import REFUSAL_KINDS
from kied.core.callbacks import Outcome
from kied.core.jobs import TERMINAL_STATES, EndedBy, JobState
from kied.store import CallbackEffect

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from prometheus_client.metrics_core import Metric

    from kied.core.jobs import Job

__all__ = ["CONTENT_TYPE", "Metrics", "auth_label", "process_age_s"]

#: The content type of :meth:`Metrics.exposition`.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

#: Authentication results, as labels: "rejected: <why>" is counted as "rejected".
_AUTH_LABELS: Final = ("open", "token", "hmac", "token+hmac", "rejected")
#: How a status query or a createTask call can go, besides what KIE said of the task.
_CALL_FAILURES: Final = ("busy", "rejected", "error")
_LOST_SUBMISSION_RESOLUTIONS: Final = ("adopted", "recreated", "given_up")
_MODES: Final = ("ACTIVE", "PASSIVE")
#: kied_status_query_rate_per_s is measured over this many seconds
_RATE_WINDOW_S: Final = 10.0
#: The (state, ended_by) pairs a job can end with, shown at 0 from the start.
_JOB_ENDS: Final = (
    (JobState.SUCCEEDED, EndedBy.CALLBACK),
    (JobState.SUCCEEDED, EndedBy.POLL),
    (JobState.SUCCEEDED, EndedBy.CALLBACK_CONFIRMED),
    (JobState.FAILED, EndedBy.CALLBACK_CONFIRMED),
    (JobState.FAILED, EndedBy.CALLBACK),
    (JobState.FAILED, EndedBy.POLL),
    (JobState.FAILED, EndedBy.SUBMIT),
    (JobState.TIMED_OUT, EndedBy.DEADLINE),
    (JobState.CANCELLED, EndedBy.CANCEL),
)
#: Jobs take seconds to minutes; the default deadline is 15 minutes.
_DURATION_BUCKETS_S: Final = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)


def auth_label(detail: str) -> str:
    """The label for an authentication result: ``open``, ``token``, ``hmac``,
    ``token+hmac``, or ``rejected`` (whatever the reason)."""
    return detail if detail in _AUTH_LABELS else "rejected"


def process_age_s() -> float | None:
    """Seconds since this process started, as the kernel recorded it; ``None`` off Linux.

    The start is the kernel's own record (``/proc/self/stat``, in clock ticks since
    boot), so it covers the interpreter's start and every import before kied's first
    line runs. It is read against ``CLOCK_BOOTTIME``, the clock the kernel uses for it,
    and is exact to a clock tick (usually 10 ms).
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        now_s = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, AttributeError):
        return None
    started = _start_ticks(stat)
    if started is None or ticks_per_s <= 0:
        return None
    return max(0.0, now_s - started / ticks_per_s)


def _start_ticks(stat: bytes) -> int | None:
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    # The fields after it start at field 3; the start time is field 22.
    _, sep, rest = stat.rpartition(b")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


class Metrics:
    """The daemon's counters and gauges, in a registry of their own.

    Args:
        mode: the daemon's mode now, ``ACTIVE`` or ``PASSIVE``; read at each scrape.
        pollers: how many pollers run now; read at each scrape.
        budget: the status-query budget (queries a second), and the shortest interval an
            overdue job gets under it now (seconds); read at each scrape.
        version: reported as ``kied_build_info{version}``.
    """

    def __init__(
        self,
        *,
        mode: Callable[[], str] = lambda: "PASSIVE",
        pollers: Callable[[], int] = lambda: 0,
        budget: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0),
        version: str = __version__,
    ) -> None:
        self.registry = CollectorRegistry()
        #: when the status queries of the last _RATE_WINDOW_S were sent (time.monotonic)
        self._recent_queries: deque[float] = deque()
        self._created_at = time.perf_counter()
        registry = self.registry

        self._responses = Counter(
            "kied_callback_responses",
            "Answers to POST /callbacks/kie, by HTTP status code (always 200).",
            ["code"],
            registry=registry,
        )
        self._responses.labels(code="200")
        self._by_outcome = Counter(
            "kied_callbacks_by_outcome",
            "Callbacks stored, by what they say of their task.",
            ["outcome"],
            registry=registry,
        )
        for outcome in Outcome:
            self._by_outcome.labels(outcome=outcome.value)
        self._by_auth = Counter(
            "kied_callbacks_by_auth",
            "Callbacks stored, by authentication result.",
            ["auth"],
            registry=registry,
        )
        for auth in _AUTH_LABELS:
            self._by_auth.labels(auth=auth)
        self._by_effect = Counter(
            "kied_callbacks_by_effect",
            "Callbacks stored, by what they did to their job.",
            ["effect"],
            registry=registry,
        )
        for effect in CallbackEffect:
            self._by_effect.labels(effect=effect.value)
        self._unstored = Counter(
            "kied_callbacks_unstored",
            "Callbacks answered 200 that could not be stored (see the log).",
            registry=registry,
        )
        self._start_to_listen = Gauge(
            "kied_start_to_listen_seconds",
            "Seconds from the process's start to the HTTP port listening.",
            registry=registry,
        )
        self._job_duration = Histogram(
            "kied_job_duration_seconds",
            "Seconds from a job's creation to its end, by what ended it.",
            ["ended_by"],
            buckets=_DURATION_BUCKETS_S,
            registry=registry,
        )
        for ended_by in EndedBy:
            self._job_duration.labels(ended_by=ended_by.value)
        self._jobs_ended = Counter(
            "kied_jobs_ended",
            "Jobs this instance ended, by the state they ended in and what ended them.",
            ["state", "ended_by"],
            registry=registry,
        )
        for state, ended_by in _JOB_ENDS:
            self._jobs_ended.labels(state=state.value, ended_by=ended_by.value)
        self._status_queries = Counter(
            "kied_status_queries",
            "Status queries sent to KIE, by result: what KIE said of the task"
            " (success, fail, pending, unknown, unknown task), or busy, rejected, error.",
            ["result"],
            registry=registry,
        )
        for result in (*(o.value for o in Outcome), "unknown task", *_CALL_FAILURES):
            self._status_queries.labels(result=result)
        self._create_task = Counter(
            "kied_create_task_calls",
            "createTask calls sent to KIE, by result: created, busy, rejected, error.",
            ["result"],
            registry=registry,
        )
        for result in ("created", *_CALL_FAILURES):
            self._create_task.labels(result=result)
        self._adoptions = Counter(
            "kied_task_adoptions",
            "Jobs that took their task id from a callback naming the job, before"
            " createTask's answer was stored.",
            registry=registry,
        )
        self._lost_submissions = Counter(
            "kied_lost_submissions",
            "createTask calls whose answer was lost (kied stopped, or KIE did not answer),"
            " by how the leader resolved them: adopted (the task's callback named the job),"
            " recreated (KIED_RESUBMIT=after-wait), given_up (KIED_RESUBMIT=never).",
            ["resolution"],
            registry=registry,
        )
        for resolution in _LOST_SUBMISSION_RESOLUTIONS:
            self._lost_submissions.labels(resolution=resolution)
        self._other_tasks = Counter(
            "kied_other_tasks",
            "Tasks reported for a job that follows another task, kept and never applied,"
            " by where they came from: callback, or create (a late createTask answer).",
            ["source"],
            registry=registry,
        )
        for source in ("callback", "create"):
            self._other_tasks.labels(source=source)
        self._webhook_attempts = Counter(
            "kied_webhook_attempts",
            "Webhook delivery attempts, by result: delivered (2xx), retry (tried again"
            " later), failed (out of attempts), gone (410: the endpoint was disabled).",
            ["result"],
            registry=registry,
        )
        for result in ("delivered", "retry", "failed", "gone"):
            self._webhook_attempts.labels(result=result)
        self._lock_acquisitions = Counter(
            "kied_lock_acquisitions",
            "Times this instance took the leadership lock (became ACTIVE).",
            registry=registry,
        )
        self._lock_losses = Counter(
            "kied_lock_losses",
            "Times this instance lost the leadership lock while ACTIVE.",
            registry=registry,
        )
        self._pruned = Counter(
            "kied_pruned",
            "Rows the retention pruner deleted, by kind: jobs, deliveries (webhook"
            " deliveries, with their attempts), inbox (callbacks), events.",
            ["kind"],
            registry=registry,
        )
        for kind in ("jobs", "deliveries", "inbox", "events"):
            self._pruned.labels(kind=kind)
        self._archived_files = Counter(
            "kied_archived_files",
            "Result files downloaded and stored, by archive backend (dir, s3).",
            ["backend"],
            registry=registry,
        )
        self._archived_bytes = Counter(
            "kied_archived_bytes",
            "Bytes of result files downloaded and stored, by archive backend.",
            ["backend"],
            registry=registry,
        )
        self._archive_failures = Counter(
            "kied_archive_failures",
            "Failed attempts at archiving a job's files: retry (tried again later),"
            " gave_up (kept in last_error; kied archive --retry-failed).",
            ["reason"],
            registry=registry,
        )
        for reason in ("retry", "gave_up"):
            self._archive_failures.labels(reason=reason)
        self._archive_refusals = Counter(
            "kied_archive_refusals",
            "Result file downloads refused, by kind: scheme, metadata, loopback, private,"
            " link_local, multicast, unspecified, reserved, too_large, redirects.",
            ["kind"],
            registry=registry,
        )
        for kind in REFUSAL_KINDS:
            self._archive_refusals.labels(kind=kind)
        self._archive_pending = Gauge(
            "kied_archive_pending",
            "Succeeded jobs whose files are still to be archived (as the leader last saw).",
            registry=registry,
        )
        self._dropped = Counter(
            "kied_callbacks_dropped",
            "Callbacks answered 200 but kept nowhere, by why: rejected_budget (more"
            " unauthenticated callbacks than KIED_REJECTED_PER_MINUTE), journal_full"
            " (storage down and the journal at KIED_JOURNAL_MAX_BYTES), journal_error.",
            ["reason"],
            registry=registry,
        )
        for reason in ("rejected_budget", "journal_full", "journal_error"):
            self._dropped.labels(reason=reason)
        self._journaled = Counter(
            "kied_callbacks_journaled",
            "Callbacks kept in the local journal while storage was down.",
            registry=registry,
        )
        self._replayed = Counter(
            "kied_journal_replayed",
            "Journal entries written to storage once it answered again.",
            registry=registry,
        )
        build = Gauge(
            "kied_build_info", "kied's version, as a label.", ["version"], registry=registry
        )
        build.labels(version=version).set(1)
        registry.register(
            _StateCollector(
                mode=mode, pollers=pollers, budget=budget, query_rate=self.status_query_rate
            )
        )

    def exposition(self) -> bytes:
        """Everything, in the Prometheus text format (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(_WithoutCreated(self.registry))

    def callback_answered(self, code: int) -> None:
        self._responses.labels(code=str(code)).inc()

    def callback_recorded(self, *, outcome: str, auth: str, effect: str) -> None:
        """A callback was stored; ``auth`` is the verdict's detail."""
        self._by_outcome.labels(outcome=outcome).inc()
        self._by_auth.labels(auth=auth_label(auth)).inc()
        self._by_effect.labels(effect=effect).inc()

    def callback_unstored(self) -> None:
        self._unstored.inc()

    def job_ended(self, job: Job) -> None:
        """This instance just wrote ``job``'s end; call it once per such write.

        A job that is not terminal (or carries no end) is not counted.
        """
        if job.state not in TERMINAL_STATES or job.ended_by is None or job.ended_at is None:
            return
        ended_by = job.ended_by.value
        self._jobs_ended.labels(state=job.state.value, ended_by=ended_by).inc()
        self._job_duration.labels(ended_by=ended_by).observe(
            max(0.0, job.ended_at - job.created_at)
        )

    def status_query(self, result: str) -> None:
        self._status_queries.labels(result=result).inc()
        now = time.monotonic()
        recent = self._recent_queries
        recent.append(now)
        while recent[0] <= now - _RATE_WINDOW_S:
            recent.popleft()

    def status_query_rate(self) -> float:
        """Status queries a second, over the last ``_RATE_WINDOW_S`` seconds."""
        recent = self._recent_queries
        cutoff = time.monotonic() - _RATE_WINDOW_S
        while recent and recent[0] <= cutoff:
            recent.popleft()
        return len(recent) / _RATE_WINDOW_S

    def create_task(self, result: str) -> None:
        self._create_task.labels(result=result).inc()

    def task_adopted(self) -> None:
        self._adoptions.inc()

    def lost_submission(self, resolution: str) -> None:
        """A createTask whose answer was lost was resolved: adopted, recreated or given_up."""
        self._lost_submissions.labels(resolution=resolution).inc()

    def other_task(self, source: str) -> None:
        self._other_tasks.labels(source=source).inc()

    def webhook_attempt(self, result: str) -> None:
        self._webhook_attempts.labels(result=result).inc()

    def lock_acquired(self) -> None:
        self._lock_acquisitions.inc()

    def lock_lost(self) -> None:
        self._lock_losses.inc()

    def port_opened(self) -> None:
        """Record how long the process took to open its port; call it once, at that moment.

        Measured from the process's start as the kernel recorded it (:func:`process_age_s`);
        where the kernel does not say, from when this object was made.
        """
        age = process_age_s()
        if age is None:
            age = time.perf_counter() - self._created_at
        self._start_to_listen.set(age)

    def file_archived(self, backend: str, size: int) -> None:
        self._archived_files.labels(backend=backend).inc()
        self._archived_bytes.labels(backend=backend).inc(size)

    def archive_failed(self, reason: str) -> None:
        """An archiving attempt failed: ``retry`` (tried again later), ``gave_up``."""
        self._archive_failures.labels(reason=reason).inc()

    def archive_refused(self, kind: str) -> None:
        """A download was refused by the address, URL or size policy (``kind``)."""
        self._archive_refusals.labels(kind=kind).inc()

    def archives_pending(self, count: int) -> None:
        self._archive_pending.set(count)

    def pruned(self, kind: str, count: int) -> None:
        """The pruner deleted ``count`` rows of ``kind`` (a ``PruneKind`` value)."""
        self._pruned.labels(kind=kind).inc(count)

    def callback_dropped(self, reason: str) -> None:
        self._dropped.labels(reason=reason).inc()

    def callback_journaled(self) -> None:
        self._journaled.inc()

    def journal_replayed(self, count: int) -> None:
        self._replayed.inc(count)


class _WithoutCreated:
    """The registry without the ``*_created`` series the client library adds to each counter
    and histogram: in the Prometheus text format they are gauges of their own, doubling the
    series for no use here. (The library's switch for this is process-wide.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _StateCollector:
    """The mode and the pollers, read from the daemon at each scrape: never stale."""

    def __init__(
        self,
        *,
        mode: Callable[[], str],
        pollers: Callable[[], int],
        budget: Callable[[], tuple[float, float]],
        query_rate: Callable[[], float],
    ) -> None:
        self._mode = mode
        self._pollers = pollers
        self._budget = budget
        self._query_rate = query_rate

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("kied_mode", "", labels=["mode"])
        yield GaugeMetricFamily("kied_pollers", "")
        yield GaugeMetricFamily("kied_status_query_budget_per_s", "")
        yield GaugeMetricFamily("kied_status_query_share_seconds", "")
        yield GaugeMetricFamily("kied_status_query_rate_per_s", "")

    def collect(self) -> Iterator[Metric]:
        current = self._mode()
        mode = GaugeMetricFamily(
            "kied_mode",
            "1 for the mode this instance is in (ACTIVE, PASSIVE), else 0.",
            labels=["mode"],
        )
        for name in _MODES:
            mode.add_metric([name], 1.0 if name == current else 0.0)
        yield mode
        yield GaugeMetricFamily(
            "kied_pollers", "Job pollers running now (0 while PASSIVE).", value=self._pollers()
        )
        budget, share = self._budget()
        yield GaugeMetricFamily(
            "kied_status_query_budget_per_s",
            "Status queries a second the pollers plan to spend (KIED_STATUS_QUERIES_PER_S).",
            value=budget,
        )
        yield GaugeMetricFamily(
            "kied_status_query_share_seconds",
            "The shortest interval between status queries of an overdue job that the budget"
            " allows now (the jobs' weights over the budget; a job not yet overdue waits"
            " 4 times as long); KIE's own schedule applies when it is longer. 0 while PASSIVE.",
            value=share,
        )
        yield GaugeMetricFamily(
            "kied_status_query_rate_per_s",
            f"Status queries sent a second, over the last {_RATE_WINDOW_S:g} s.",
            value=self._query_rate(),
        )
