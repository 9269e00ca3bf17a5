from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from kied.core.auth import body_is_authenticated, check_callback_auth, kie_signature

NOW = 1_767_225_600.0


def sign(key: bytes, task_id: str, ts: str) -> str:
    mac = hmac.new(key, f"{task_id}.{ts}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def verdict(**kw):
    args = dict(
        token=None,
        given_token=None,
        hmac_key=None,
        task_id="t1",
        timestamp=None,
        signature=None,
        now=NOW,
        max_skew_s=300,
    )
    args.update(kw)
    return check_callback_auth(**args)


def test_signature_matches_kie_formula():
    assert kie_signature(b"k", "t1", "100") == sign(b"k", "t1", "100")


def test_open_when_nothing_is_configured():
    v = verdict()
    assert v.authenticated
    assert v.detail == "open"


@pytest.mark.parametrize(
    ("given", "ok", "detail"),
    [
        ("s3cret", True, "token"),
        ("wrong", False, "rejected: wrong callback token"),
        (None, False, "rejected: no callback token"),
    ],
)
def test_token(given, ok, detail):
    v = verdict(token="s3cret", given_token=given)
    assert (v.authenticated, v.detail) == (ok, detail)


def test_hmac_accepted_inside_the_window():
    ts = str(int(NOW) - 299)
    v = verdict(hmac_key=b"key", timestamp=ts, signature=sign(b"key", "t1", ts))
    assert (v.authenticated, v.detail) == (True, "hmac")


@pytest.mark.parametrize(
    ("ts", "sig_for", "task_id", "reason"),
    [
        (str(int(NOW) - 301), "t1", "t1", "outside the window"),
        (str(int(NOW) + 301), "t1", "t1", "outside the window"),
        ("abc", "t1", "t1", "bad webhook timestamp"),
        (str(int(NOW)), "other", "t1", "bad webhook signature"),
        (str(int(NOW)), "t1", None, "no task id"),
    ],
)
def test_hmac_rejections(ts, sig_for, task_id, reason):
    v = verdict(hmac_key=b"key", timestamp=ts, signature=sign(b"key", sig_for, ts), task_id=task_id)
    assert not v.authenticated
    assert reason in v.detail


def test_hmac_garbage_signature_and_missing_headers():
    assert not verdict(hmac_key=b"k", timestamp=str(int(NOW)), signature="%%%").authenticated
    assert verdict(hmac_key=b"k").detail == "rejected: no webhook signature"


def test_both_mechanisms_must_pass():
    ts = str(int(NOW))
    good = sign(b"k", "t1", ts)
    assert (
        verdict(token="a", given_token="a", hmac_key=b"k", timestamp=ts, signature=good).detail
        == "token+hmac"
    )
    assert not verdict(
        token="a", given_token="b", hmac_key=b"k", timestamp=ts, signature=good
    ).authenticated


def test_a_verified_signature_has_a_digest_to_accept_it_once():
    ts = str(int(NOW))
    v = verdict(hmac_key=b"k", timestamp=ts, signature=sign(b"k", "t1", ts))
    expected = hashlib.sha256(f"t1.{ts}.{sign(b'k', 't1', ts)}".encode()).hexdigest()
    assert v.signature_digest == expected
    # the same signature with a padded timestamp header is the same signature
    assert verdict(hmac_key=b"k", timestamp=f" {ts} ", signature=sign(b"k", "t1", ts)) == v
    # another timestamp is another signature
    later = str(int(NOW) + 1)
    other = verdict(hmac_key=b"k", timestamp=later, signature=sign(b"k", "t1", later))
    assert other.signature_digest not in (None, expected)
    # no signature checked, no digest
    assert verdict(token="a", given_token="a").signature_digest is None
    assert verdict(hmac_key=b"k", timestamp=ts, signature="%%%").signature_digest is None


def test_another_spelling_of_the_same_mac_has_the_same_digest():
    # base64 leaves the low bits of the last character before "=" unused: four spellings
    # decode to one MAC. A replay must not pass as new by changing them.
    ts = str(int(NOW))
    good = sign(b"k", "t1", ts)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(good[-2])
    respelt = good[:-2] + alphabet[last ^ 1] + "="
    assert respelt != good
    assert base64.b64decode(respelt) == base64.b64decode(good)
    v = verdict(hmac_key=b"k", timestamp=ts, signature=respelt)
    assert v.authenticated
    assert (
        v.signature_digest == verdict(hmac_key=b"k", timestamp=ts, signature=good).signature_digest
    )


@pytest.mark.parametrize(
    ("detail", "covered"),
    [("open", True), ("token", True), ("token+hmac", True), ("hmac", False)],
)
def test_only_a_signature_alone_leaves_the_body_unauthenticated(detail, covered):
    assert body_is_authenticated(detail) is covered
