from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from kied.core.webhooks import (
    DEFAULT_SCHEDULE_S,
    Verdict,
    parse_secret,
    retry_delay,
    sign,
    verdict,
)

KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(KEY).decode()


def test_a_signature_verifies_with_the_reference_package():
    body = b'{"type":"job.succeeded","data":{"id":"j"}}'
    now = int(datetime.now(UTC).timestamp())
    other = b"another key, being rotated out.."
    header = sign([other, parse_secret(SECRET)], "evt_1", now, body)
    assert header.count("v1,") == 2
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now), "webhook-signature": header}
    assert Webhook(SECRET).verify(body, headers) == {"type": "job.succeeded", "data": {"id": "j"}}
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body + b" ", headers)


@pytest.mark.parametrize("bad", ["", "abc", "whsec_", "whsec_!!!!", "whsec_" + "QUJD"])
def test_bad_secrets_are_refused(bad):
    with pytest.raises(ValueError, match="webhook secret"):
        parse_secret(bad)


def test_verdicts():
    assert [verdict(c) for c in (200, 204, 299, 301, 400, 410, 429, 500)] == [
        Verdict.DELIVERED,
        Verdict.DELIVERED,
        Verdict.DELIVERED,
        Verdict.RETRY,
        Verdict.RETRY,
        Verdict.GONE,
        Verdict.RETRY,
        Verdict.RETRY,
    ]


def test_the_retry_schedule_with_jitter_and_retry_after():
    delays = [retry_delay(n, DEFAULT_SCHEDULE_S, jitter=0.5) for n in range(1, 9)]
    assert delays == [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0, None]
    assert retry_delay(1, DEFAULT_SCHEDULE_S, jitter=0.0) == pytest.approx(4.5)
    assert retry_delay(1, DEFAULT_SCHEDULE_S, jitter=0.999) == pytest.approx(5.5, abs=0.01)
    assert retry_delay(1, DEFAULT_SCHEDULE_S, jitter=0.5, retry_after_s=120) == 120.0
    assert retry_delay(2, DEFAULT_SCHEDULE_S, jitter=0.5, retry_after_s=120) == 300.0
    assert retry_delay(1, DEFAULT_SCHEDULE_S, jitter=0.5, retry_after_s=1e9) == 36000.0
