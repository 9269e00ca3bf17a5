"""The poll schedule, backoff and callback health: plain arithmetic, exact numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kied.core.families import Family
from kied.core.schedule import (
    CallbackHealth,
    FleetLoad,
    PollBudget,
    PollPolicy,
    backoff_delay,
    budget_window,
    first_poll_delay,
    fleet_idle,
    next_poll_delay,
    planned_poll_delay,
    poll_weight,
    share_interval_s,
)

POLICY = PollPolicy()
#: The largest jitter there is: just below 1.
TOP = math.nextafter(1.0, 0.0)

# ============================================================================================
# next_poll_delay


@pytest.mark.parametrize(
    ("elapsed_s", "low", "high"),
    [
        (-5.0, 2.0, 3.0),  # clocks disagree: counts as 0
        (0.0, 2.0, 3.0),
        (29.999, 2.0, 3.0),
        (30.0, 5.0, 10.0),  # a boundary belongs to the next step
        (119.999, 5.0, 10.0),
        (120.0, 15.0, 30.0),
        (899.0, 15.0, 30.0),
        (1e12, 15.0, 30.0),
        (math.inf, 15.0, 30.0),
    ],
)
def test_next_poll_delay_walks_kies_recommended_steps(
    elapsed_s: float, low: float, high: float
) -> None:
    assert next_poll_delay(elapsed_s, POLICY, jitter=0.0) == low
    assert next_poll_delay(elapsed_s, POLICY, jitter=0.5) == (low + high) / 2
    top = next_poll_delay(elapsed_s, POLICY, jitter=TOP)
    assert low < top <= high
    assert top == pytest.approx(high)


def test_next_poll_delay_follows_a_custom_policy() -> None:
    policy = PollPolicy(steps=((10.0, 1.0, 1.0), (math.inf, 4.0, 8.0)))
    assert next_poll_delay(9.0, policy, jitter=0.9) == 1.0
    assert next_poll_delay(10.0, policy, jitter=0.25) == 5.0


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_jitter_outside_0_1_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        next_poll_delay(0.0, POLICY, jitter=jitter)
    with pytest.raises(ValueError, match="jitter"):
        first_poll_delay(POLICY, callbacks_healthy=True, typical_duration_s=None, jitter=jitter)
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(1, POLICY, jitter=jitter)


def test_nan_elapsed_is_refused() -> None:
    with pytest.raises(ValueError, match="elapsed_s"):
        next_poll_delay(math.nan, POLICY, jitter=0.0)


@given(
    elapsed=st.floats(min_value=-1e6, max_value=1e9, allow_nan=False),
    jitter=st.floats(min_value=0.0, max_value=TOP),
)
def test_next_poll_delay_stays_within_its_step(elapsed: float, jitter: float) -> None:
    delay = next_poll_delay(elapsed, POLICY, jitter=jitter)
    until, low, high = next(step for step in POLICY.steps if max(elapsed, 0.0) < step[0])
    assert low <= delay <= high
    assert until > elapsed


# ============================================================================================
# first_poll_delay


def test_first_poll_with_unhealthy_callbacks_is_the_first_step() -> None:
    for typical in (None, 5.0, 600.0):
        assert (
            first_poll_delay(POLICY, callbacks_healthy=False, typical_duration_s=typical, jitter=0)
            == 2.0
        )
        assert (
            first_poll_delay(
                POLICY, callbacks_healthy=False, typical_duration_s=typical, jitter=0.5
            )
            == 2.5
        )


@pytest.mark.parametrize(
    ("typical", "expected"),
    [
        (None, 60.0),  # nothing known: the floor
        (0.0, 60.0),
        (10.0, 60.0),  # 1.5 x 10 = 15 < 60
        (40.0, 60.0),  # 1.5 x 40 = 60
        (41.0, 61.5),
        (300.0, 450.0),  # a Veo video: 5 min typical, first query at 7.5 min
    ],
)
def test_first_poll_with_healthy_callbacks_waits_until_overdue(
    typical: float | None, expected: float
) -> None:
    delay = first_poll_delay(POLICY, callbacks_healthy=True, typical_duration_s=typical, jitter=0)
    assert delay == expected
    stretched = first_poll_delay(
        POLICY, callbacks_healthy=True, typical_duration_s=typical, jitter=0.5
    )
    assert stretched == pytest.approx(expected * 1.05)
    top = first_poll_delay(POLICY, callbacks_healthy=True, typical_duration_s=typical, jitter=TOP)
    assert expected < top <= expected * 1.1
    assert top == pytest.approx(expected * 1.1)


def test_first_poll_overdue_floor_and_factor_are_the_policys() -> None:
    policy = PollPolicy(overdue_floor_s=10.0, overdue_factor=2.0, overdue_jitter=0.0)
    assert first_poll_delay(policy, callbacks_healthy=True, typical_duration_s=3, jitter=0.9) == 10
    assert first_poll_delay(policy, callbacks_healthy=True, typical_duration_s=30, jitter=0.9) == 60


@pytest.mark.parametrize("typical", [-1.0, math.nan, math.inf])
def test_first_poll_refuses_a_nonsense_typical_duration(typical: float) -> None:
    with pytest.raises(ValueError, match="typical_duration_s"):
        first_poll_delay(POLICY, callbacks_healthy=True, typical_duration_s=typical, jitter=0)


# ============================================================================================
# backoff_delay


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    delays = [backoff_delay(n, POLICY, jitter=0.0) for n in range(1, 9)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_backoff_jitter_only_shortens() -> None:
    assert backoff_delay(1, POLICY, jitter=0.5) == 2.0 * (1 - 0.25 * 0.5)
    assert backoff_delay(3, POLICY, jitter=TOP) == pytest.approx(8.0 * 0.75)
    assert backoff_delay(20, POLICY, jitter=TOP) == pytest.approx(60.0 * 0.75)
    assert backoff_delay(20, POLICY, jitter=TOP) >= 45.0


def test_backoff_survives_any_number_of_failures() -> None:
    assert backoff_delay(10**6, POLICY, jitter=0.0) == 60.0


@pytest.mark.parametrize(
    ("failures", "retry_after_s", "expected"),
    [
        (1, 5.0, 5.0),  # Retry-After longer than the backoff: honoured
        (1, 1.0, 2.0),  # shorter: the backoff stands
        (4, 10.0, 16.0),
        (1, 0.0, 2.0),
        (1, -3.0, 2.0),  # nonsense counts as 0
        (8, 120.0, 120.0),  # honoured even past backoff_max_s
        (2, None, 4.0),
    ],
)
def test_backoff_honours_retry_after(
    failures: int, retry_after_s: float | None, expected: float
) -> None:
    assert backoff_delay(failures, POLICY, jitter=0.0, retry_after_s=retry_after_s) == expected


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="failures"):
        backoff_delay(0, POLICY, jitter=0.0)
    with pytest.raises(ValueError, match="retry_after_s"):
        backoff_delay(1, POLICY, jitter=0.0, retry_after_s=math.nan)


@given(
    failures=st.integers(min_value=1, max_value=10_000),
    jitter=st.floats(min_value=0.0, max_value=TOP),
    retry_after=st.none() | st.floats(min_value=0.0, max_value=1e6),
)
def test_backoff_is_bounded(failures: int, jitter: float, retry_after: float | None) -> None:
    delay = backoff_delay(failures, POLICY, jitter=jitter, retry_after_s=retry_after)
    assert 0 < delay <= max(POLICY.backoff_max_s, retry_after or 0.0)
    assert delay >= (retry_after or 0.0)
    assert delay >= 0.75 * min(POLICY.backoff_max_s, POLICY.backoff_base_s)


# ============================================================================================
# PollPolicy validation


@pytest.mark.parametrize(
    "changes",
    [
        {"steps": ()},
        {"steps": ((30.0, 2.0, 3.0),)},  # does not end at inf
        {"steps": ((30.0, 2.0, 3.0), (20.0, 5.0, 10.0), (math.inf, 15.0, 30.0))},
        {"steps": ((30.0, 3.0, 2.0), (math.inf, 15.0, 30.0))},  # min > max
        {"steps": ((math.inf, 0.0, 1.0),)},  # a zero delay would spin
        {"steps": ((math.inf, 1.0, math.inf),)},
        {"overdue_floor_s": -1.0},
        {"overdue_factor": math.nan},
        {"backoff_base_s": 0.0},
        {"backoff_base_s": 10.0, "backoff_max_s": 5.0},
        {"backoff_jitter": 1.5},
        {"overdue_jitter": -0.1},
    ],
)
def test_policy_refuses_nonsense(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="PollPolicy"):
        PollPolicy(**changes)  # type: ignore[arg-type]


# ============================================================================================
# CallbackHealth


def test_health_is_not_presumed_before_a_callback_is_heard() -> None:
    # A fresh daemon whose callbacks are all lost must not wait for jobs to be overdue.
    assert not CallbackHealth().healthy(1e9)
    polled = CallbackHealth()
    polled.job_finished("market", "m", 60.0, by="poll")  # a job ended with no callback heard
    assert not polled.healthy(1e9)
    called = CallbackHealth()
    called.job_finished("market", "m", 60.0, by="callback")  # unauthenticated: not heard
    assert not called.healthy(1e9)


def test_health_needs_a_recent_authenticated_callback() -> None:
    health = CallbackHealth(window_s=600.0)
    health.callback_received(1000.0)
    assert health.healthy(1000.0)
    assert health.healthy(1600.0)  # exactly window_s later
    assert not health.healthy(1600.001)
    health.callback_received(900.0)  # an older stamp arriving late changes nothing
    assert not health.healthy(1600.001)
    health.callback_received(1700.0)
    assert health.healthy(2000.0)


def test_health_needs_most_recent_finishes_by_callback() -> None:
    health = CallbackHealth(recent=4, min_callback_share=0.5)
    health.callback_received(0.0)
    health.job_finished("market", "m", 10.0, by="callback")
    assert health.healthy(1.0)
    health.job_finished("market", "m", 10.0, by="poll")
    assert health.healthy(1.0)  # 1 of 2: exactly half
    health.job_finished("market", "m", 10.0, by="poll")
    assert not health.healthy(1.0)  # 1 of 3
    for _ in range(2):
        health.job_finished("market", "m", 10.0, by="callback")
    # the window holds the last 4: poll, poll, callback, callback
    assert health.healthy(1.0)
    health.job_finished("veo", None, 10.0, by="poll")  # poll, callback, callback, poll
    assert health.healthy(1.0)
    health.job_finished("veo", None, 10.0, by="poll")  # callback, callback, poll, poll
    assert health.healthy(1.0)
    health.job_finished("veo", None, 10.0, by="poll")  # callback, poll, poll, poll
    assert not health.healthy(1.0)


def test_health_recovers_once_callbacks_finish_jobs_again() -> None:
    health = CallbackHealth(recent=3)
    for _ in range(10):
        health.job_finished("market", "m", 1.0, by="poll")
    health.callback_received(5.0)
    assert not health.healthy(5.0)
    for _ in range(2):
        health.job_finished("market", "m", 1.0, by="callback")
    assert health.healthy(5.0)


def test_typical_duration_is_a_high_percentile_of_callback_finishes() -> None:
    health = CallbackHealth(durations_kept=10, quantile=0.9, min_samples=3)
    assert health.typical_duration_s("veo", "veo3") is None
    health.job_finished("veo", "veo3", 100.0, by="callback")
    health.job_finished("veo", "veo3", 300.0, by="callback")
    assert health.typical_duration_s("veo", "veo3") is None  # too few
    health.job_finished("veo", "veo3", 200.0, by="callback")
    assert health.typical_duration_s("veo", "veo3") == 300.0
    for d in range(1, 11):  # the window keeps only the last 10: 10, 20, ..., 100
        health.job_finished("veo", "veo3", 10.0 * d, by="callback")
    assert health.typical_duration_s("veo", "veo3") == 90.0
    # per (family, model): other pairs know nothing yet
    assert health.typical_duration_s("veo", "veo3_fast") is None
    assert health.typical_duration_s("market", "veo3") is None
    # a Family works as its string value
    assert health.typical_duration_s(Family.VEO, "veo3") == 90.0


def test_poll_finishes_and_nonsense_durations_do_not_feed_the_typical_duration() -> None:
    health = CallbackHealth(min_samples=1)
    health.job_finished("market", None, 1000.0, by="poll")
    assert health.typical_duration_s("market", None) is None
    for bad in (-1.0, math.nan, math.inf):
        health.job_finished("market", None, bad, by="callback")
    assert health.typical_duration_s("market", None) is None
    health.job_finished("market", None, 12.5, by="callback")
    assert health.typical_duration_s("market", None) == 12.5


def test_health_memory_is_bounded() -> None:
    health = CallbackHealth(durations_kept=5, min_samples=1, max_keys=3, recent=7)
    for n in range(1000):
        health.job_finished("market", f"model-{n % 10}", float(n), by="callback")
    assert len(health._durations) == 3
    assert all(len(d) <= 5 for d in health._durations.values())
    assert len(health._finishes) == 7
    assert sum(health._counts.values()) == 7
    # the pairs finished most recently are the ones kept
    assert health.typical_duration_s("market", "model-9") == 999.0
    assert health.typical_duration_s("market", "model-6") is None
    for _ in range(100):
        health.job_finished("veo", None, 1.0, by="callback")
    assert len(health._durations[("veo", None)]) == 5


def test_a_pair_that_keeps_finishing_is_not_forgotten() -> None:
    health = CallbackHealth(min_samples=1, max_keys=2)
    health.job_finished("veo", "a", 1.0, by="callback")
    health.job_finished("veo", "b", 2.0, by="callback")
    health.job_finished("veo", "a", 1.0, by="callback")  # a is now the most recent
    health.job_finished("veo", "c", 3.0, by="callback")  # b goes
    assert health.typical_duration_s("veo", "a") == 1.0
    assert health.typical_duration_s("veo", "b") is None
    assert health.typical_duration_s("veo", "c") == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0.0},
        {"window_s": math.inf},
        {"min_callback_share": 1.5},
        {"quantile": 0.0},
        {"recent": 0},
        {"durations_kept": 0},
        {"max_keys": 0},
        {"min_samples": 6, "durations_kept": 5},
    ],
)
def test_health_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each names its own argument
        CallbackHealth(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("elapsed", "jitter", "expected"),
    [
        (0.0, 0.0, 2.0),  # never shorter than KIE's schedule
        (60.0, 0.0, 60.0),  # the age: it doubles between queries
        (90.0, 0.5, 90.0 * 1.05),
        (119.0, 0.0, 119.0),
        (500.0, 0.0, 120.0),  # capped
        (500.0, 0.9, 120.0 * 1.09),
    ],
)
def test_healthy_callbacks_back_off_with_the_jobs_age(elapsed, jitter, expected):
    policy = PollPolicy()
    assert next_poll_delay(elapsed, policy, jitter=jitter, callbacks_healthy=True) == pytest.approx(
        expected
    )
    assert next_poll_delay(elapsed, policy, jitter=jitter) <= 30.0


def test_healthy_cap_is_validated():
    with pytest.raises(ValueError, match="healthy_max_interval_s"):
        PollPolicy(healthy_max_interval_s=-1.0)


# ============================================================================================
# sharing the status-query budget: poll_weight, fleet_idle, planned_poll_delay, PollBudget

IDLE = FleetLoad(jobs=1, weight=0.25)


def plan(
    age_s: float,
    *,
    typical: float | None = None,
    load: FleetLoad = IDLE,
    budget: float = 8.0,
    healthy: bool = False,
    first: bool = False,
    jitter: float = 0.0,
) -> tuple[float, float]:
    return planned_poll_delay(
        age_s,
        typical_duration_s=typical,
        load=load,
        budget_per_s=budget,
        callbacks_healthy=healthy,
        first=first,
        policy=POLICY,
        jitter=jitter,
    )


@pytest.mark.parametrize(
    ("age_s", "typical", "weight"),
    [
        (0.0, 10.0, 0.25),
        (9.999, 10.0, 0.25),
        (10.0, 10.0, 1.0),  # overdue from the typical duration on
        (59.9, None, 0.25),  # unknown: overdue after overdue_floor_s
        (60.0, None, 1.0),
        (0.0, 0.0, 1.0),
    ],
)
def test_poll_weight_favours_overdue_jobs(age_s: float, typical: float | None, weight: float):
    assert poll_weight(age_s, typical, POLICY) == weight


def test_fleet_idle_is_every_job_every_idle_interval_within_the_budget() -> None:
    assert fleet_idle(24, 8.0, POLICY)  # 24 jobs every 3 s: 8 a second
    assert not fleet_idle(25, 8.0, POLICY)
    assert fleet_idle(0, 0.5, POLICY)
    assert not fleet_idle(2, 0.5, PollPolicy(idle_interval_s=1.0))


def test_the_share_interval_is_the_fleets_weight_over_the_budget() -> None:
    assert share_interval_s(FleetLoad(10, 4.0), 8.0) == 0.5
    assert share_interval_s(FleetLoad(0, 0.0), 8.0) == 0.0
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="budget_per_s"):
            share_interval_s(FleetLoad(1, 1.0), bad)
    for weight in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weight"):
            share_interval_s(FleetLoad(1, weight), 8.0)


@pytest.mark.parametrize("healthy", [False, True])
def test_few_jobs_follow_kies_schedule_even_with_healthy_callbacks(healthy: bool) -> None:
    # An idle fleet: the first query 2-3 s after creation, whatever callbacks do.
    assert plan(0.0, healthy=healthy, first=True) == (2.0, 0.25)
    # (a first query is put off by up to the job's share: 0.25 / 8 / 0.25 s here)
    assert plan(0.0, healthy=healthy, first=True, jitter=TOP)[0] == pytest.approx(3.125)
    assert plan(45.0, healthy=healthy, load=FleetLoad(24, 6.0))[0] == 5.0
    assert plan(200.0, healthy=healthy, load=FleetLoad(24, 24.0))[0] == 15.0


def test_healthy_callbacks_and_a_busy_fleet_wait_until_the_job_is_overdue() -> None:
    busy = FleetLoad(jobs=25, weight=25 * 0.25)
    # First query: at overdue_floor_s (typical unknown), or 1.5 x the typical duration.
    assert plan(0.0, healthy=True, first=True, load=busy) == (60.0, 0.25)
    assert plan(10.0, healthy=True, first=True, load=busy)[0] == 50.0
    assert plan(0.0, typical=50.0, healthy=True, first=True, load=busy)[0] == 75.0
    # Later queries: as long as the job has existed (the healthy back-off).
    assert plan(40.0, typical=50.0, healthy=True, load=busy)[0] == 40.0
    # Older than its typical duration, it weighs more, but its callback is still expected:
    # no query before 1.5 x the typical duration, then as long apart as it has existed.
    assert plan(50.0, typical=50.0, healthy=True, load=busy) == (50.0, 1.0)
    assert plan(60.0, typical=50.0, healthy=True, load=busy, first=True) == (15.0, 1.0)
    assert plan(80.0, typical=50.0, healthy=True, load=busy) == (80.0, 1.0)
    assert plan(500.0, typical=50.0, healthy=True, load=busy) == (120.0, 1.0)
    # Without healthy callbacks a busy fleet keeps KIE's schedule (stretched if need be):
    # first queries spread over the job's share (3.125 s here) from KIE's 2-3 s on.
    assert plan(0.0, first=True, load=busy)[0] == 2.0
    assert plan(0.0, first=True, load=busy, jitter=TOP)[0] == pytest.approx(3.0 + 3.125)
    assert plan(5.0, load=busy, jitter=TOP)[0] == pytest.approx(3.125)


def test_the_share_stretches_by_weight_and_overdue_jobs_come_first() -> None:
    load = FleetLoad(jobs=1000, weight=80.0)  # a share of 10 s for a weight of 1
    fresh = plan(0.0, typical=20.0, load=load)
    overdue = plan(25.0, typical=20.0, load=load)
    old_overdue = plan(500.0, typical=20.0, load=load)
    assert fresh == (40.0, 0.25)
    assert overdue == (10.0, 1.0)  # four times as often
    assert old_overdue == (15.0, 1.0)  # KIE's schedule for its age is slower still
    # A short share leaves KIE's schedule as it is.
    assert plan(25.0, typical=20.0, load=FleetLoad(10, 8.0))[0] == 2.0
    assert plan(0.0, typical=20.0, load=FleetLoad(10, 4.0))[0] == 2.0
    assert plan(0.0, typical=20.0, load=FleetLoad(10, 6.0))[0] == 3.0


def test_planned_delay_refuses_nonsense() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="budget_per_s"):
            plan(0.0, budget=bad)
    with pytest.raises(ValueError, match="weight"):
        plan(0.0, load=FleetLoad(1, math.nan))
    with pytest.raises(ValueError, match="jitter"):
        plan(0.0, jitter=1.0)
    with pytest.raises(ValueError, match="NaN"):
        plan(math.nan)


_JOB = st.tuples(
    st.floats(min_value=-5, max_value=5000),  # age
    st.one_of(st.none(), st.floats(min_value=0, max_value=600)),  # typical duration
    st.floats(min_value=0, max_value=1, exclude_max=True),  # jitter
    st.booleans(),  # first
)


@given(
    jobs=st.lists(_JOB, min_size=1, max_size=300),
    budget=st.floats(min_value=0.1, max_value=50),
    healthy=st.booleans(),
)
def test_a_planned_fleet_stays_within_its_budget(
    jobs: list[tuple[float, float | None, float, bool]], budget: float, healthy: bool
) -> None:
    # With the fleet's weights added up, the queries a second the jobs plan add up to at
    # most the budget; no job asks more often than KIE's schedule for its age; a first
    # query comes within the job's share after that; and of two jobs of an age, an overdue
    # one never waits longer.
    ledger = PollBudget(budget)
    for key, (age, typical, _, _) in enumerate(jobs):
        ledger.weigh(key, poll_weight(max(age, 0.0), typical, POLICY))
    load = ledger.load()
    assert load.jobs == len(jobs)
    total = 0.0
    for age, typical, jitter, first in jobs:
        asked = {"load": load, "budget": budget, "healthy": healthy, "jitter": jitter}
        delay, weight = plan(age, typical=typical, first=first, **asked)
        assert delay >= next_poll_delay(age, POLICY, jitter=jitter)
        assert weight == poll_weight(max(age, 0.0), typical, POLICY)
        if first:
            # (one query, not a rate: a cohort of first queries is spread over the share)
            later, _ = plan(age, typical=typical, first=False, **asked)
            own_share = load.weight / budget / weight
            assert delay <= later + own_share * (1 + 1e-9)
        else:
            total += 1.0 / delay
        if weight < 1:
            overdue, _ = plan(age, typical=0.0, first=first, **asked)
            assert overdue <= delay
    assert total <= budget * (1 + 1e-9)


def test_poll_budget_keeps_the_sum_in_constant_time() -> None:
    ledger = PollBudget(8.0)
    assert ledger.load() == FleetLoad(0, 0.0)
    ledger.weigh("a", 1.0)
    ledger.weigh("b", 0.25)
    ledger.weigh("a", 0.5)  # replaced, not added
    assert ledger.load() == FleetLoad(2, 0.75)
    assert ledger.share_s() == 0.75 / 8
    ledger.forget("a")
    ledger.forget("a")  # twice is harmless
    ledger.forget("nobody")
    assert ledger.load() == FleetLoad(1, 0.25)
    for key in range(1000):
        ledger.weigh(key, 0.1)
    for key in range(1000):
        ledger.forget(key)
    ledger.resum()
    assert ledger.load() == FleetLoad(1, 0.25)
    ledger.forget("b")
    assert ledger.load() == FleetLoad(0, 0.0)  # no rounding left over
    with pytest.raises(ValueError, match="per_s"):
        PollBudget(0)
    with pytest.raises(ValueError, match="weight"):
        ledger.weigh("c", math.nan)
    with pytest.raises(ValueError, match="weight"):
        ledger.weigh("c", -1.0)


def test_policy_refuses_a_weight_below_one_and_a_bad_idle_interval() -> None:
    with pytest.raises(ValueError, match="overdue_weight"):
        PollPolicy(overdue_weight=0.5)
    with pytest.raises(ValueError, match="idle_interval_s"):
        PollPolicy(idle_interval_s=-1.0)


def test_seeding_health_starts_again_from_storage() -> None:
    health = CallbackHealth(recent=4, min_samples=2)
    health.job_finished("market", "m", 99.0, by="callback")
    health.callback_received(500.0)
    health.seed(
        [("market", "m", 10.0, "callback"), ("market", "m", 12.0, "callback")]
        + [("market", "m", 50.0, "poll")] * 3,
        last_callback_at=400.0,
    )
    # The durations and finishes are storage's (the 99 s is gone; 3 of 4 by poll) ...
    assert health.typical_duration_s("market", "m") == 12.0
    assert not health.healthy(450.0)
    # ... the newest callback heard here is kept.
    health.seed([("market", "m", 10.0, "callback")], last_callback_at=100.0)
    assert health.healthy(500.0 + 599.0)
    fresh = CallbackHealth()
    fresh.seed([], last_callback_at=None)
    assert not fresh.healthy(0.0)  # no evidence: nothing presumed


def test_a_busy_healthy_fleet_queries_nothing_before_it_is_overdue_and_spreads_first_queries():
    busy = FleetLoad(jobs=40, weight=10.0)  # a share of 1.25 s, 5 s for a weight of 1/4
    # Asked once while the fleet was idle, a job then waits until it is overdue.
    assert plan(2.0, healthy=True, load=busy)[0] == 58.0
    assert plan(2.0, typical=50.0, healthy=True, load=busy)[0] == 73.0
    # First queries are spread over the job's share (40 jobs of weight 1/4 over 5 s), from
    # KIE's 2-3 s on, rather than left unasked for a whole share.
    assert plan(0.0, load=busy, first=True)[0] == 2.0
    assert plan(0.0, load=busy, first=True, jitter=0.5)[0] == 2.5 + 2.5
    assert plan(0.0, load=busy, jitter=0.5)[0] == 5.0  # later ones keep the share


@pytest.mark.parametrize(
    ("per_s", "limit", "window_s"),
    [(8.0, 80, 10.0), (9.0, 90, 10.0), (2.3, 23, 10.0), (0.25, 2, 10.0), (0.01, 1, 100.0)],
)
def test_the_budget_is_a_hard_cap_over_ten_seconds_or_one_query(
    per_s: float, limit: int, window_s: float
) -> None:
    got_limit, got_window_s = budget_window(per_s)
    assert (got_limit, got_window_s) == (limit, pytest.approx(window_s))
    assert got_limit / got_window_s <= per_s  # never more than the budget, rounding included
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="per_s"):
            budget_window(bad)
