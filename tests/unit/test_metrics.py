"""The metrics' pure helpers, and a registry of one's own per :class:`Metrics`."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kied.core.jobs import EndedBy, Job, JobId, JobState
from kied.metrics import Metrics, _start_ticks, auth_label, process_age_s


@pytest.mark.parametrize(
    ("detail", "label"),
    [
        ("open", "open"),
        ("token", "token"),
        ("hmac", "hmac"),
        ("token+hmac", "token+hmac"),
        ("rejected: no callback token", "rejected"),
        ("rejected: bad webhook signature", "rejected"),
        ("something new", "rejected"),
    ],
)
def test_auth_label(detail, label):
    assert auth_label(detail) == label


# A real line of /proc/self/stat, and one whose command name holds ") " and digits.
STAT = (
    b"4242 (python3) S 1 4242 4242 0 -1 4194560 2200 0 0 0 11 3 0 0 20 0 1 0 "
    b"987654 25600000 4000 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 3 0 0 0 0 0\n"
)


def test_start_ticks_reads_field_22():
    assert _start_ticks(STAT) == 987654
    odd = STAT.replace(b"(python3)", b"(a) b 1 2 (c)")
    assert _start_ticks(odd) == 987654


@pytest.mark.parametrize("stat", [b"", b"4242 (python3) S 1 2 3", b"1 (x) " + b"y " * 30])
def test_start_ticks_of_an_unreadable_line_is_none(stat):
    assert _start_ticks(stat) is None


def test_process_age_is_the_age_of_this_process():
    age = process_age_s()
    if age is None:
        pytest.skip("no /proc here")
    assert 0 < age < 24 * 3600


def job(state: JobState, ended_by: EndedBy | None, *, created_at=100.0, ended_at=None) -> Job:
    return Job(
        id=JobId("j"),
        family="market",
        model=None,
        task_id=None,
        state=state,
        request=None,
        metadata=None,
        idempotency_key=None,
        created_at=created_at,
        updated_at=created_at,
        deadline_at=created_at + 900,
        ended_by=ended_by,
        ended_at=ended_at,
    )


def test_job_ended_counts_terminal_jobs_with_their_duration():
    metrics = Metrics()
    metrics.job_ended(job(JobState.PENDING, None))
    metrics.job_ended(job(JobState.SUCCEEDED, EndedBy.POLL, ended_at=142.5))
    metrics.job_ended(job(JobState.TIMED_OUT, EndedBy.DEADLINE, ended_at=1000.0))
    get = metrics.registry.get_sample_value
    assert get("kied_jobs_ended_total", {"state": "succeeded", "ended_by": "poll"}) == 1
    assert get("kied_jobs_ended_total", {"state": "timed_out", "ended_by": "deadline"}) == 1
    assert get("kied_jobs_ended_total", {"state": "pending", "ended_by": "poll"}) is None
    assert get("kied_job_duration_seconds_sum", {"ended_by": "poll"}) == 42.5
    assert get("kied_job_duration_seconds_bucket", {"ended_by": "poll", "le": "60.0"}) == 1
    assert get("kied_job_duration_seconds_bucket", {"ended_by": "poll", "le": "30.0"}) == 0
    assert get("kied_job_duration_seconds_sum", {"ended_by": "deadline"}) == 900


def test_each_metrics_has_its_own_registry_and_the_global_one_is_untouched():
    one, two = Metrics(), Metrics()
    one.callback_answered(200)
    assert one.registry.get_sample_value("kied_callback_responses_total", {"code": "200"}) == 1
    assert two.registry.get_sample_value("kied_callback_responses_total", {"code": "200"}) == 0
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("kied_") for name in names)


def test_the_exposition_parses_and_has_every_metric_from_the_start():
    mode = "PASSIVE"
    metrics = Metrics(mode=lambda: mode, pollers=lambda: 7, version="9.9")
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert set(families) == {
        "kied_callback_responses",
        "kied_callbacks_by_outcome",
        "kied_callbacks_by_auth",
        "kied_callbacks_by_effect",
        "kied_callbacks_unstored",
        "kied_start_to_listen_seconds",
        "kied_job_duration_seconds",
        "kied_jobs_ended",
        "kied_status_queries",
        "kied_create_task_calls",
        "kied_task_adoptions",
        "kied_lost_submissions",
        "kied_other_tasks",
        "kied_webhook_attempts",
        "kied_lock_acquisitions",
        "kied_lock_losses",
        "kied_pruned",
        "kied_callbacks_dropped",
        "kied_callbacks_journaled",
        "kied_journal_replayed",
        "kied_archived_files",
        "kied_archived_bytes",
        "kied_archive_failures",
        "kied_archive_refusals",
        "kied_archive_pending",
        "kied_build_info",
        "kied_mode",
        "kied_pollers",
        "kied_status_query_budget_per_s",
        "kied_status_query_share_seconds",
        "kied_status_query_rate_per_s",
    }
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)
    assert [(s.labels, s.value) for s in families["kied_mode"].samples] == [
        ({"mode": "ACTIVE"}, 0),
        ({"mode": "PASSIVE"}, 1),
    ]
    assert families["kied_pollers"].samples[0].value == 7
    assert families["kied_build_info"].samples[0].labels == {"version": "9.9"}
    mode = "ACTIVE"  # read at each scrape
    again = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert [s.value for s in again["kied_mode"].samples] == [1, 0]


def test_callbacks_are_counted_by_outcome_auth_and_effect():
    metrics = Metrics()
    metrics.callback_recorded(
        outcome="success", auth="rejected: wrong callback token", effect="rejected"
    )
    metrics.callback_recorded(outcome="fail", auth="token+hmac", effect="changed")
    get = metrics.registry.get_sample_value
    assert get("kied_callbacks_by_auth_total", {"auth": "rejected"}) == 1
    assert get("kied_callbacks_by_auth_total", {"auth": "token+hmac"}) == 1
    assert get("kied_callbacks_by_outcome_total", {"outcome": "success"}) == 1
    assert get("kied_callbacks_by_effect_total", {"effect": "changed"}) == 1


def test_the_port_opening_is_measured_once_set():
    metrics = Metrics()
    assert metrics.registry.get_sample_value("kied_start_to_listen_seconds") == 0
    metrics.port_opened()
    assert metrics.registry.get_sample_value("kied_start_to_listen_seconds") > 0


def test_the_status_query_budget_demand_and_rate_are_shown():
    metrics = Metrics(budget=lambda: (8.0, 2.5))
    for _ in range(30):
        metrics.status_query("pending")
    get = metrics.registry.get_sample_value
    assert get("kied_status_query_budget_per_s") == 8.0
    assert get("kied_status_query_share_seconds") == 2.5
    assert get("kied_status_query_rate_per_s") == 3.0  # 30 over the last 10 s
    assert Metrics().registry.get_sample_value("kied_status_query_rate_per_s") == 0.0
