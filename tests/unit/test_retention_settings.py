"""The retention settings: defaults, forever, and bad values."""

from __future__ import annotations

import pytest

from kied.errors import ConfigError
from kied.pruner import Retention
from kied.settings import load_settings
from kied.store import PruneKind

DAY = 86400.0


def test_defaults_keep_jobs_a_month_callbacks_two_weeks_events_a_week():
    retention = Retention.of(load_settings({}))
    assert retention == Retention(events_s=7 * DAY, jobs_s=30 * DAY, inbox_s=14 * DAY)
    assert retention.kept_s(PruneKind.DELIVERIES) == 30 * DAY  # deliveries go with jobs


@pytest.mark.parametrize("forever", ["0", "never", "NEVER", " 0.0 "])
def test_zero_or_never_keeps_forever(forever):
    settings = load_settings(
        {"KIED_JOB_RETENTION_DAYS": forever, "KIED_INBOX_RETENTION_DAYS": forever}
    )
    assert (settings.job_retention_s, settings.inbox_retention_s) == (None, None)


def test_days_may_be_fractions():
    settings = load_settings({"KIED_JOB_RETENTION_DAYS": "90", "KIED_INBOX_RETENTION_DAYS": "0.5"})
    assert (settings.job_retention_s, settings.inbox_retention_s) == (90 * DAY, DAY / 2)


@pytest.mark.parametrize("setting", ["KIED_JOB_RETENTION_DAYS", "KIED_INBOX_RETENTION_DAYS"])
@pytest.mark.parametrize("value", ["-1", "a month", "nan", "inf", "3651", "forever"])
def test_bad_values_name_the_setting(setting, value):
    with pytest.raises(ConfigError) as info:
        load_settings({setting: value})
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")
    assert "0 or never" in str(info.value)
