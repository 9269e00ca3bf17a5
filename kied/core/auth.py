"""Callback authentication: kied's own token, and KIE's webhook signature.

KIE signs ``taskId + "." + timestamp`` with HMAC-SHA256 under the account's
``webhookHmacKey`` and sends the base64 digest in ``X-Webhook-Signature`` beside
``X-Webhook-Timestamp`` (Unix seconds). The signature does not cover the body, nor
the query: it proves that KIE sent *a* callback for that task at that time, not what the
callback says. So under the signature alone (:data:`HMAC_ONLY`) the body is a hint that
kied confirms with one status query (:func:`body_is_authenticated`), and each signature is
accepted once (:attr:`AuthVerdict.signature_digest`, remembered by the store).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HMAC_ONLY",
    "REPLAYED",
    "AuthVerdict",
    "body_is_authenticated",
    "check_callback_auth",
    "kie_signature",
]

#: The verdict of a callback authenticated by KIE's signature alone.
HMAC_ONLY: Final = "hmac"
#: The verdict of a callback whose valid signature was already accepted once.
REPLAYED: Final = "rejected: replayed signature"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthVerdict:
    authenticated: bool
    #: "open" (no secret configured), "token", "hmac", "token+hmac", or why it was rejected
    detail: str
    #: for a callback whose signature was verified: what identifies that signature, to
    #: accept it once (sha256 hex of ``taskId.timestamp.signature``, the signature in its
    #: canonical base64 so that no other spelling of the same MAC passes as new)
    signature_digest: str | None = None


def body_is_authenticated(detail: str) -> bool:
    """Whether an authenticated callback's body and query are covered by its authentication.

    The callback token travels in kied's own callback URL (over HTTPS): a callback that
    carries it came from whoever was given that URL, body and all. KIE's signature alone
    covers only the task id and the timestamp, so the body of an ``"hmac"`` callback is a
    hint to confirm. ``"open"`` authenticates nothing and trusts everything, by choice.
    """
    return detail != HMAC_ONLY


def kie_signature(key: bytes, task_id: str, timestamp: str) -> str:
    """The base64 HMAC-SHA256 signature KIE sends for ``task_id`` at ``timestamp``."""
    mac = hmac.new(key, f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")


def _verified_digest(key: bytes, task_id: str, timestamp: str, signature: str) -> str | None:
    """The signature's digest (see :class:`AuthVerdict`) when it is right, else None."""
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    mac = hmac.new(key, f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, given):
        return None
    canonical = base64.b64encode(mac).decode("ascii")
    return hashlib.sha256(f"{task_id}.{timestamp}.{canonical}".encode()).hexdigest()


def check_callback_auth(
    *,
    token: str | None,
    given_token: str | None,
    hmac_key: bytes | None,
    task_id: str | None,
    timestamp: str | None,
    signature: str | None,
    now: float,
    max_skew_s: float,
) -> AuthVerdict:
    """Decide whether a callback is authentic. Every configured mechanism must pass.

    Args:
        token: kied's callback token, or ``None`` when not configured.
        given_token: the token the callback carried (query ``token`` or header).
        hmac_key: KIE's webhook HMAC key, or ``None`` when not configured.
        task_id: the task id found in the callback.
        timestamp: the ``X-Webhook-Timestamp`` header.
        signature: the ``X-Webhook-Signature`` header.
        now: the current Unix time.
        max_skew_s: how far the timestamp may be from ``now``.
    """
    passed: list[str] = []
    if token is not None:
        if given_token is None:
            return AuthVerdict(authenticated=False, detail="rejected: no callback token")
        if not hmac.compare_digest(token.encode(), given_token.encode()):
            return AuthVerdict(authenticated=False, detail="rejected: wrong callback token")
        passed.append("token")
    if hmac_key is not None:
        if not timestamp or not signature:
            return AuthVerdict(authenticated=False, detail="rejected: no webhook signature")
        try:
            sent_at = int(timestamp.strip())
        except ValueError:
            return AuthVerdict(authenticated=False, detail="rejected: bad webhook timestamp")
        if abs(now - sent_at) > max_skew_s:
            return AuthVerdict(
                authenticated=False, detail="rejected: webhook timestamp outside the window"
            )
        if task_id is None:
            return AuthVerdict(
                authenticated=False, detail="rejected: signed callback has no task id"
            )
        digest = _verified_digest(hmac_key, task_id, timestamp.strip(), signature)
        if digest is None:
            return AuthVerdict(authenticated=False, detail="rejected: bad webhook signature")
        passed.append("hmac")
    else:
        digest = None
    return AuthVerdict(
        authenticated=True, detail="+".join(passed) or "open", signature_digest=digest
    )
