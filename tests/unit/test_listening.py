"""The stretch of time no instance listened for callbacks: plain arithmetic on spans."""

from __future__ import annotations

from kied.listening import unheard_before
from kied.store import ListeningSpan


def span(instance: str, since: float, until: float) -> ListeningSpan:
    return ListeningSpan(instance=instance, since=since, until=until)


def test_nothing_recorded_before_this_instance_is_a_gap_up_to_its_start() -> None:
    # A database from before listening was recorded, or the very first start: every job
    # created before this instance listened may have ended unheard.
    assert unheard_before([], instance="me", since=100.0, now=150.0) == 100.0
    only_mine = [span("me", 100.0, 120.0)]
    assert unheard_before(only_mine, instance="me", since=100.0, now=150.0) == 100.0
    assert unheard_before([], instance="me", since=150.0, now=150.0) is None


def test_a_restart_leaves_a_gap_from_the_last_heartbeat_to_the_start() -> None:
    spans = [span("old", 0.0, 95.0)]
    assert unheard_before(spans, instance="me", since=130.0, now=131.0) == 130.0


def test_an_overlapping_deploy_or_a_passive_instance_leaves_no_gap() -> None:
    # The new instance started before the old one stopped ...
    assert unheard_before([span("old", 0.0, 95.0)], instance="me", since=90.0, now=99.0) is None
    # ... or another instance listened throughout.
    assert (
        unheard_before([span("other", 0.0, 500.0)], instance="me", since=300.0, now=400.0) is None
    )
    # This instance itself listened throughout (it leads again after losing the lock).
    spans = [span("old", -100.0, 5.0), span("me", 0.0, 10.0)]
    assert unheard_before(spans, instance="me", since=0.0, now=400.0) is None
    # Before the oldest span nothing is known, but no job is that old: not a gap.
    assert unheard_before([span("old", 50.0, 95.0)], instance="me", since=90.0, now=99.0) is None


def test_the_newest_gap_counts() -> None:
    spans = [span("a", 0.0, 10.0), span("b", 20.0, 40.0), span("c", 35.0, 60.0)]
    # gaps: (10, 20) and (60, 70): jobs created before 70 may have ended unheard
    assert unheard_before(spans, instance="me", since=70.0, now=80.0) == 70.0
    # with the later gap closed by another instance, the earlier one is the newest
    spans.append(span("d", 55.0, 90.0))
    assert unheard_before(spans, instance="me", since=70.0, now=80.0) == 20.0


def test_own_stored_span_is_replaced_by_since_and_now() -> None:
    # A span stored under this instance's name (an earlier heartbeat) does not hide a gap.
    spans = [span("old", 0.0, 10.0), span("me", 0.0, 100.0)]
    assert unheard_before(spans, instance="me", since=50.0, now=100.0) == 50.0
