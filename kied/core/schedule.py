"""When to ask KIE about a task: the poll schedule, backoff, and how far callbacks are trusted.

Polling is the safety net under KIE's callbacks. What is scarce is not a status query as such
but the budget of them: KIE lets a key make 10 a second, and kied keeps a share of that for the
application (``KIED_STATUS_QUERIES_PER_S``). So how eagerly a poller asks depends on how many
jobs share that budget, and on how well callbacks are doing:

- :func:`next_poll_delay` is KIE's recommended schedule (every 2-3 s at first, then slower).
  While few jobs are in flight, every job follows it, even while callbacks look healthy: a lost
  callback then costs the user seconds, not a minute.
- :class:`PollBudget` keeps, in O(1) per change, the jobs in flight and their total weight
  (:func:`poll_weight`: a job overdue against the typical duration of its family and model
  weighs most). :func:`planned_poll_delay` gives each job at most its weight's share of the
  budget, so that the total stays within it and overdue jobs are asked first.
- While callbacks arrive and finish most jobs (:class:`CallbackHealth`) and the fleet is busy
  (:func:`fleet_idle`), a job's first status query waits until the job is overdue
  (:func:`first_poll_delay`: at least ``overdue_floor_s``, or ``overdue_factor`` times the
  typical duration), so a busy fleet with working callbacks spends at most about one query
  a job.
- After a failed query, :func:`backoff_delay` backs off exponentially and honours
  ``Retry-After``.

Everything here is plain arithmetic: randomness comes in as a ``jitter`` argument in [0, 1)
and time as ``at``/``now`` arguments, so the same inputs always give the same delays.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "BUDGET_WINDOW_S",
    "CallbackHealth",
    "FinishedBy",
    "FleetLoad",
    "PollBudget",
    "PollPolicy",
    "backoff_delay",
    "budget_window",
    "first_poll_delay",
    "fleet_idle",
    "next_poll_delay",
    "planned_poll_delay",
    "poll_weight",
    "retry_after_s",
    "share_interval_s",
]

#: 2**this is the largest backoff factor computed; anything past it is capped anyway.
_MAX_DOUBLINGS: Final = 64
#: the status-query budget holds over any window this long: the pollers' plans keep to it
#: on average, and KIE's client keeps it as a hard cap (:func:`budget_window`). Within it,
#: a catch-up may go as fast as KIE lets a key query (10 a second) for a few seconds.
BUDGET_WINDOW_S: Final = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PollPolicy:
    """How often a poller asks KIE about a task, and how it backs off. Validated on creation.

    Raises:
        ValueError: a field is out of range (steps unordered or not ending at ``math.inf``,
            a negative or non-finite duration, a fraction outside [0, 1]).
    """

    #: KIE's recommended schedule, as ``(until_elapsed_s, min_s, max_s)``: every 2-3 s for
    #: the first 30 s, every 5-10 s up to 2 min, every 15-30 s after that.
    steps: tuple[tuple[float, float, float], ...] = (
        (30.0, 2.0, 3.0),
        (120.0, 5.0, 10.0),
        (math.inf, 15.0, 30.0),
    )
    #: with healthy callbacks, the first query waits at least this ...
    overdue_floor_s: float = 60.0
    #: ... or this times the typical duration of such jobs, whichever is longer
    overdue_factor: float = 1.5
    #: that overdue wait is stretched by up to this fraction, so that jobs created together
    #: are not all queried together
    overdue_jitter: float = 0.1
    #: with healthy callbacks, a job still running when queried is queried again after as
    #: long as it has existed (its age doubles between queries), but at most this long
    healthy_max_interval_s: float = 120.0
    #: the first delay after an upstream error (429/455/5xx/network); it doubles per failure
    backoff_base_s: float = 2.0
    backoff_max_s: float = 60.0
    #: a backoff is shortened by up to this fraction (never lengthened past backoff_max_s)
    backoff_jitter: float = 0.25
    #: a job older than the typical duration of its family and model is overdue, and weighs
    #: this many times as much as one that is not when the status-query budget is shared out
    overdue_weight: float = 4.0
    #: the fleet is idle while every job in flight could be queried this often within the
    #: budget; then jobs follow KIE's schedule even while callbacks are healthy
    idle_interval_s: float = 3.0

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("PollPolicy.steps must not be empty")
        previous = -math.inf
        for until_s, min_s, max_s in self.steps:
            if not until_s > previous:
                raise ValueError("PollPolicy.steps must be in increasing until_elapsed_s order")
            if not (_finite(min_s) and _finite(max_s) and 0 < min_s <= max_s):
                raise ValueError(f"PollPolicy.steps: need 0 < min_s <= max_s, got {min_s}, {max_s}")
            previous = until_s
        if previous != math.inf:
            raise ValueError("PollPolicy.steps must end with until_elapsed_s = math.inf")
        for name in (
            "overdue_floor_s",
            "overdue_factor",
            "backoff_base_s",
            "backoff_max_s",
            "healthy_max_interval_s",
            "idle_interval_s",
        ):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                raise ValueError(f"PollPolicy.{name} must be finite and >= 0, got {value}")
        if self.backoff_base_s <= 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError("PollPolicy needs 0 < backoff_base_s <= backoff_max_s")
        if not (_finite(self.overdue_weight) and self.overdue_weight >= 1):
            raise ValueError(f"PollPolicy.overdue_weight must be >= 1, got {self.overdue_weight}")
        for name in ("overdue_jitter", "backoff_jitter"):
            value = getattr(self, name)
            if not (_finite(value) and 0 <= value <= 1):
                raise ValueError(f"PollPolicy.{name} must be in [0, 1], got {value}")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check_jitter(jitter: float) -> None:
    if not (_finite(jitter) and 0 <= jitter < 1):
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")


def next_poll_delay(
    elapsed_s: float, policy: PollPolicy, *, jitter: float, callbacks_healthy: bool = False
) -> float:
    """The delay before the next status query of a job that is ``elapsed_s`` old.

    Args:
        elapsed_s: seconds since the job was created. A negative age (clocks disagree) counts
            as 0.
        policy: the schedule; the step that applies is the first whose ``until_elapsed_s``
            is greater than ``elapsed_s``.
        jitter: in [0, 1); 0 picks the step's ``min_s``, values towards 1 its ``max_s``.
        callbacks_healthy: callbacks are arriving, so a query only checks that this job's
            was not lost: the delay grows with the job's age, up to
            ``healthy_max_interval_s``, and is never shorter than the step's.

    Returns:
        Seconds, within ``[min_s, max_s]`` of the step, or the healthy back-off.

    Raises:
        ValueError: ``jitter`` is outside [0, 1), or ``elapsed_s`` is NaN.
    """
    _check_jitter(jitter)
    if math.isnan(elapsed_s):
        raise ValueError("elapsed_s must be a number, got NaN")
    elapsed_s = max(elapsed_s, 0.0)
    # The last step (until math.inf) also takes an infinite age.
    _, min_s, max_s = next((step for step in policy.steps if elapsed_s < step[0]), policy.steps[-1])
    step = min_s + jitter * (max_s - min_s)
    if not callbacks_healthy:
        return step
    backoff = min(elapsed_s, policy.healthy_max_interval_s) * (1 + policy.overdue_jitter * jitter)
    return max(step, backoff)


def first_poll_delay(
    policy: PollPolicy,
    *,
    callbacks_healthy: bool,
    typical_duration_s: float | None,
    jitter: float,
) -> float:
    """The delay between creating a job and its first status query.

    Args:
        policy: the schedule.
        callbacks_healthy: whether callbacks can be expected to report the outcome
            (:meth:`CallbackHealth.healthy`).
        typical_duration_s: how long such jobs usually take
            (:meth:`CallbackHealth.typical_duration_s`), or None when not known.
        jitter: in [0, 1).

    Returns:
        With healthy callbacks, ``max(overdue_floor_s, overdue_factor * typical_duration_s)``
        stretched by up to ``overdue_jitter``; otherwise the first step of the schedule,
        ``next_poll_delay(0, policy, jitter=jitter)``.

    Raises:
        ValueError: ``jitter`` is outside [0, 1), or ``typical_duration_s`` is negative or not
            finite.
    """
    _check_jitter(jitter)
    if not callbacks_healthy:
        return next_poll_delay(0.0, policy, jitter=jitter)
    overdue_s = policy.overdue_floor_s
    if typical_duration_s is not None:
        if not (_finite(typical_duration_s) and typical_duration_s >= 0):
            raise ValueError(
                f"typical_duration_s must be finite and >= 0, got {typical_duration_s}"
            )
        overdue_s = max(overdue_s, policy.overdue_factor * typical_duration_s)
    return overdue_s * (1.0 + policy.overdue_jitter * jitter)


def backoff_delay(
    failures: int,
    policy: PollPolicy,
    *,
    jitter: float,
    retry_after_s: float | None = None,
) -> float:
    """The delay before asking KIE again after ``failures`` failed attempts in a row.

    Args:
        failures: consecutive failures so far, at least 1.
        policy: ``backoff_base_s`` doubles per failure, up to ``backoff_max_s``.
        jitter: in [0, 1); shortens the delay by up to ``backoff_jitter`` of it.
        retry_after_s: KIE's (or a proxy's) ``Retry-After``, if it sent one. It is a floor:
            the delay is never shorter, even past ``backoff_max_s``. Negative counts as 0.

    Returns:
        ``min(backoff_max_s, backoff_base_s * 2 ** (failures - 1)) * (1 - backoff_jitter *
        jitter)``, raised to ``retry_after_s``.

    Raises:
        ValueError: ``failures`` < 1, ``jitter`` outside [0, 1), or ``retry_after_s`` NaN.
    """
    _check_jitter(jitter)
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    doublings = min(failures - 1, _MAX_DOUBLINGS)
    delay = min(policy.backoff_max_s, policy.backoff_base_s * 2.0**doublings)
    delay *= 1.0 - policy.backoff_jitter * jitter
    if retry_after_s is not None:
        if math.isnan(retry_after_s):
            raise ValueError("retry_after_s must be a number, got NaN")
        delay = max(delay, retry_after_s)
    return delay


# -- sharing the status-query budget --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetLoad:
    """The jobs in flight as the budget sees them (:meth:`PollBudget.load`)."""

    #: jobs whose task is followed now
    jobs: int
    #: their weights (:func:`poll_weight`) added up
    weight: float


def poll_weight(age_s: float, typical_duration_s: float | None, policy: PollPolicy) -> float:
    """How much a job weighs when the budget is shared out: 1 once it is overdue, else
    ``1 / overdue_weight``.

    A job is overdue once older than ``typical_duration_s``, or, while the typical duration
    of its family and model is not known, than ``overdue_floor_s``.
    """
    overdue_after = policy.overdue_floor_s if typical_duration_s is None else typical_duration_s
    return 1.0 if age_s >= overdue_after else 1.0 / policy.overdue_weight


def fleet_idle(jobs: int, budget_per_s: float, policy: PollPolicy) -> bool:
    """Whether ``jobs`` in flight could each be queried every ``idle_interval_s`` within
    ``budget_per_s``: then even jobs whose callbacks are expected follow KIE's schedule."""
    return jobs <= budget_per_s * policy.idle_interval_s


def share_interval_s(load: FleetLoad, budget_per_s: float) -> float:
    """The shortest interval a job of weight 1 gets: ``load.weight / budget_per_s``; a job
    of weight ``w`` gets this divided by ``w``."""
    if not (_finite(budget_per_s) and budget_per_s > 0):
        raise ValueError(f"budget_per_s must be finite and > 0, got {budget_per_s}")
    if not (_finite(load.weight) and load.weight >= 0):
        raise ValueError(f"the fleet's weight must be finite and >= 0, got {load.weight}")
    return load.weight / budget_per_s


def planned_poll_delay(
    age_s: float,
    *,
    typical_duration_s: float | None,
    load: FleetLoad,
    budget_per_s: float,
    callbacks_healthy: bool,
    first: bool,
    policy: PollPolicy,
    jitter: float,
) -> tuple[float, float]:
    """The delay before a job's next status query, within the fleet's budget.

    The job's own interval (its base) is KIE's schedule for its age (:func:`next_poll_delay`),
    or, while callbacks are healthy and the fleet is busy (not :func:`fleet_idle`), the
    healthy schedule: no query until the job is overdue (:func:`first_poll_delay`: at least
    ``overdue_floor_s``, or ``overdue_factor`` times the typical duration), and later ones as
    long apart as the job has existed, so that a busy fleet whose callbacks work spends at
    most about one query a job. The job then gets at most its weight's share of the budget
    (:func:`share_interval_s`)::

        delay = max(base, (load.weight / budget_per_s) / w)

    A first query has no interval to keep: it comes after the base and a further ``jitter``
    times that share, so that jobs created or taken over together are spread evenly over
    their share, from their base on, instead of asked at once (or left unasked for a
    whole share)::

        first delay = base + jitter * (load.weight / budget_per_s) / w

    A job so planned asks at most ``w * budget_per_s / load.weight`` queries a second, so
    while ``load.weight`` adds up the weights of the jobs in flight, together they ask at
    most ``budget_per_s`` (first queries too: n jobs of weight w planned together ask
    theirs over ``n * w / budget_per_s`` seconds). While few jobs are in flight the share
    is short and every job follows its base; as more come, every interval is stretched, an
    overdue job's least.
    The arithmetic is O(1): the fleet comes in as the one sum :class:`PollBudget` keeps.

    Args:
        age_s: seconds since the job was created (negative counts as 0).
        typical_duration_s: how long jobs of its family and model usually take, or None.
        load: the jobs in flight and their weight, this job's included.
        budget_per_s: status queries a second the fleet may spend, > 0.
        callbacks_healthy: whether callbacks can be expected to report the job's outcome.
        first: the job has not been queried yet (on this instance).
        policy: the schedule.
        jitter: in [0, 1).

    Returns:
        ``(delay_s, weight)``: seconds from now to the next query, and the job's weight to
        record in :meth:`PollBudget.weigh`.

    Raises:
        ValueError: ``jitter`` is outside [0, 1), ``budget_per_s`` is not > 0, or an age,
            weight or duration is NaN or out of range.
    """
    share_s = share_interval_s(load, budget_per_s)
    step = next_poll_delay(age_s, policy, jitter=jitter)
    age_s = max(age_s, 0.0)
    weight = poll_weight(age_s, typical_duration_s, policy)
    base = step
    if callbacks_healthy and not fleet_idle(load.jobs, budget_per_s, policy):
        overdue_at = first_poll_delay(
            policy, callbacks_healthy=True, typical_duration_s=typical_duration_s, jitter=jitter
        )
        base = max(base, overdue_at - age_s)
        if not first:
            base = max(base, next_poll_delay(age_s, policy, jitter=jitter, callbacks_healthy=True))
    own_share_s = share_s / weight
    if first:
        # Jobs created (or taken over) together would all be asked together: a first query
        # comes somewhere in the job's share after its base, which spreads n such jobs over
        # n / budget s.
        return base + jitter * own_share_s, weight
    return max(base, own_share_s), weight


def budget_window(per_s: float) -> tuple[int, float]:
    """The status-query budget as a hard cap, ``(queries, per seconds)``: ``per_s`` over any
    :data:`BUDGET_WINDOW_S`, or over the time one query takes at that rate when longer.

    Raises:
        ValueError: ``per_s`` is not finite and > 0.
    """
    if not (_finite(per_s) and per_s > 0):
        raise ValueError(f"per_s must be finite and > 0, got {per_s}")
    window_s = max(BUDGET_WINDOW_S, 1.0 / per_s)
    return max(1, math.floor(per_s * window_s + 1e-9)), window_s


class PollBudget:
    """The status-query budget shared by the jobs in flight: their weights, added up.

    Each job's weight (from :func:`planned_poll_delay`) is kept per key, and the sum updated
    on every change, so that a plan costs O(1) whether 10 or 100,000 jobs are in flight. The
    sum is recomputed from the weights by :meth:`resum` (now and then), so that float
    rounding does not build up.

    Args:
        per_s: status queries a second the fleet may spend, > 0.

    Raises:
        ValueError: ``per_s`` is not finite and > 0.
    """

    def __init__(self, per_s: float) -> None:
        if not (_finite(per_s) and per_s > 0):
            raise ValueError(f"per_s must be finite and > 0, got {per_s}")
        self.per_s = float(per_s)
        self._weights: dict[object, float] = {}
        self._sum = 0.0

    def weigh(self, key: object, weight: float) -> None:
        """Record (or replace) the weight of ``key``."""
        if not (_finite(weight) and weight >= 0):
            raise ValueError(f"a weight must be finite and >= 0, got {weight}")
        self._sum += weight - self._weights.get(key, 0.0)
        self._weights[key] = weight

    def forget(self, key: object) -> None:
        """``key`` is no longer in flight."""
        self._sum -= self._weights.pop(key, 0.0)
        if not self._weights:
            self._sum = 0.0

    def resum(self) -> None:
        """Add the weights up again (O(n): call it rarely, e.g. on a rescan of storage)."""
        self._sum = math.fsum(self._weights.values())

    def load(self) -> FleetLoad:
        """The jobs in flight and their total weight."""
        return FleetLoad(jobs=len(self._weights), weight=max(self._sum, 0.0))

    def share_s(self) -> float:
        """:func:`share_interval_s` of the jobs in flight now."""
        return share_interval_s(self.load(), self.per_s)


# -- how well callbacks are doing -----------------------------------------------------------

#: Who reported a job's outcome first.
FinishedBy = Literal["callback", "poll"]


class CallbackHealth:
    """A bounded, in-memory record of how jobs finish, and how long they take.

    Fed with events (:meth:`callback_received`, :meth:`job_finished`), it answers whether
    callbacks can be trusted to report outcomes (:meth:`healthy`) and how long jobs of a
    family and model usually take (:meth:`typical_duration_s`). Times (``at``, ``now``) are in
    whatever clock the caller uses, as long as it is always the same one.

    Memory is bounded: ``recent`` finishes, and ``durations_kept`` durations for each of at
    most ``max_keys`` (family, model) pairs, the least recently finished pair forgotten first.

    Args:
        window_s: callbacks count as arriving if the last authenticated one came at most this
            long ago.
        recent: how many of the most recent finishes :meth:`healthy` looks at.
        min_callback_share: the share of those finishes that must have come by callback.
        durations_kept: durations remembered per (family, model).
        quantile: which quantile of those durations is "typical" (nearest rank).
        min_samples: fewer durations than this and the typical duration is not known.
        max_keys: (family, model) pairs remembered.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        *,
        window_s: float = 600.0,
        recent: int = 20,
        min_callback_share: float = 0.5,
        durations_kept: int = 50,
        quantile: float = 0.9,
        min_samples: int = 3,
        max_keys: int = 256,
    ) -> None:
        if not (_finite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be finite and > 0, got {window_s}")
        if not (_finite(min_callback_share) and 0 <= min_callback_share <= 1):
            raise ValueError(f"min_callback_share must be in [0, 1], got {min_callback_share}")
        if not (_finite(quantile) and 0 < quantile <= 1):
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if min(recent, durations_kept, min_samples, max_keys) < 1:
            raise ValueError("recent, durations_kept, min_samples and max_keys must be >= 1")
        if min_samples > durations_kept:
            raise ValueError("min_samples must not exceed durations_kept")
        self._window_s = window_s
        self._min_share = min_callback_share
        self._durations_kept = durations_kept
        self._quantile = quantile
        self._min_samples = min_samples
        self._max_keys = max_keys
        self._last_callback_at: float | None = None
        self._finishes: deque[FinishedBy] = deque(maxlen=recent)
        self._counts: Counter[FinishedBy] = Counter()
        self._durations: OrderedDict[tuple[str, str | None], deque[float]] = OrderedDict()

    def callback_received(self, at: float) -> None:
        """An authenticated callback arrived at ``at`` (whatever it changed)."""
        if self._last_callback_at is None or at > self._last_callback_at:
            self._last_callback_at = at

    def job_finished(
        self, family: str, model: str | None, duration_s: float, *, by: FinishedBy
    ) -> None:
        """A job of ``family`` and ``model`` ended after ``duration_s``, reported ``by`` whom.

        Only durations reported by callback feed :meth:`typical_duration_s`: a poll learns of
        the outcome some time after it happened, and with healthy callbacks it only asks once
        a job is overdue, so its durations would push the typical duration up and up.
        A negative or non-finite duration is not recorded.
        """
        if len(self._finishes) == self._finishes.maxlen:
            self._counts[self._finishes[0]] -= 1
        self._finishes.append(by)
        self._counts[by] += 1
        if by != "callback" or not (_finite(duration_s) and duration_s >= 0):
            return
        key = (str(family), model)
        durations = self._durations.get(key)
        if durations is None:
            durations = self._durations[key] = deque(maxlen=self._durations_kept)
            if len(self._durations) > self._max_keys:
                self._durations.popitem(last=False)
        else:
            self._durations.move_to_end(key)
        durations.append(float(duration_s))

    def seed(
        self,
        finishes: Iterable[tuple[str, str | None, float, FinishedBy]],
        *,
        last_callback_at: float | None,
    ) -> None:
        """Start again from what storage remembers: ``finishes`` (family, model, duration,
        by whom), oldest first, and the newest callback's time.

        A new leader calls it so as not to start cold. Storage has every instance's
        finishes, so they replace those recorded here; a callback heard here later than
        ``last_callback_at`` is kept.
        """
        self._finishes.clear()
        self._counts.clear()
        self._durations.clear()
        for family, model, duration_s, by in finishes:
            self.job_finished(family, model, duration_s, by=by)
        if last_callback_at is not None:
            self.callback_received(last_callback_at)

    def healthy(self, now: float) -> bool:
        """Whether callbacks can be trusted to report outcomes.

        True when an authenticated callback arrived within ``window_s`` of ``now`` and at
        least ``min_callback_share`` of the recent finishes came by callback (with no finishes
        yet, the first condition decides).

        Nothing is presumed: until an authenticated callback is heard, callbacks are not
        trusted, so a fresh instance (or one whose callbacks never come) spends its budget
        of status queries rather than letting jobs wait until overdue
        (:func:`planned_poll_delay`); the first callback settles the question.
        """
        last = self._last_callback_at
        total = len(self._finishes)
        if last is None:
            return False
        if now - last > self._window_s:
            return False
        return total == 0 or self._counts["callback"] >= self._min_share * total

    def typical_duration_s(self, family: str, model: str | None) -> float | None:
        """The ``quantile`` of recent durations of jobs of ``family`` and ``model``, or None.

        None until ``min_samples`` jobs of the pair have finished by callback.
        """
        durations = self._durations.get((str(family), model))
        if durations is None or len(durations) < self._min_samples:
            return None
        ordered = sorted(durations)
        rank = math.ceil(self._quantile * len(ordered))
        return ordered[max(rank, 1) - 1]


def retry_after_s(header: str | None) -> float | None:
    """A ``Retry-After`` header in seconds; None when absent, negative, or an HTTP date
    (not honoured)."""
    if header is None:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
