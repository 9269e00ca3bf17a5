from __future__ import annotations

import itertools

import pytest

from kied.core.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    EventKind,
    JobState,
    advance,
    is_late,
    sources,
    target,
)
from kied.errors import IllegalTransitionError

S = JobState
E = EventKind

EXPECTED = {
    (S.SUBMITTING, E.ACCEPTED): S.PENDING,
    (S.SUBMITTING, E.PROGRESS): S.PENDING,
    (S.SUBMITTING, E.SUCCEEDED): S.SUCCEEDED,
    (S.SUBMITTING, E.FAILED): S.FAILED,
    (S.SUBMITTING, E.DEADLINE): S.TIMED_OUT,
    (S.SUBMITTING, E.CANCEL): S.CANCELLED,
    (S.PENDING, E.ACCEPTED): S.PENDING,
    (S.PENDING, E.PROGRESS): S.PENDING,
    (S.PENDING, E.SUCCEEDED): S.SUCCEEDED,
    (S.PENDING, E.FAILED): S.FAILED,
    (S.PENDING, E.DEADLINE): S.TIMED_OUT,
    (S.PENDING, E.CANCEL): S.CANCELLED,
    (S.TIMED_OUT, E.SUCCEEDED): S.SUCCEEDED,
    (S.TIMED_OUT, E.FAILED): S.FAILED,
    (S.TIMED_OUT, E.CANCEL): S.CANCELLED,
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(JobState, EventKind)))
def test_the_whole_table(state, event):
    if (state, event) in EXPECTED:
        assert advance(state, event) is EXPECTED[(state, event)]
        assert state in sources(event)
        assert target(event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(IllegalTransitionError):
            advance(state, event)
        assert state not in sources(event)


def test_succeeded_failed_and_cancelled_are_sticky():
    for state in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        for event in EventKind:
            assert state not in sources(event)


def test_only_outcomes_after_the_deadline_are_late():
    late = {(s, e) for s, e in itertools.product(JobState, EventKind) if is_late(s, e)}
    assert late == {(S.TIMED_OUT, E.SUCCEEDED), (S.TIMED_OUT, E.FAILED)}


def test_state_sets():
    assert ACTIVE_STATES == {S.SUBMITTING, S.PENDING}
    assert TERMINAL_STATES | ACTIVE_STATES == set(JobState)
    assert not TERMINAL_STATES & ACTIVE_STATES
