"""Callback authentication: kied's own token, and KIE's webhook signature.

KIE signs ``taskId + "." + timestamp`` with HMAC-SHA256 under the account's
``webhookHmacKey`` and sends the base64 digest in ``X-Webhook-Signature`` beside
``X-Webhook-Timestamp`` (Unix seconds). The signature does not cover the body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

__all__ = ["AuthVerdict", "check_callback_auth", "kie_signature"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthVerdict:
    authenticated: bool
    #: "open" (no secret configured), "token", "hmac", "token+hmac", or why it was rejected
    detail: str


def kie_signature(key: bytes, task_id: str, timestamp: str) -> str:
    """The base64 HMAC-SHA256 signature KIE sends for ``task_id`` at ``timestamp``."""
    mac = hmac.new(key, f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")


def _signature_ok(key: bytes, task_id: str, timestamp: str, signature: str) -> bool:
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    mac = hmac.new(key, f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return hmac.compare_digest(mac, given)


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
        if not _signature_ok(hmac_key, task_id, timestamp.strip(), signature):
            return AuthVerdict(authenticated=False, detail="rejected: bad webhook signature")
        passed.append("hmac")
    return AuthVerdict(authenticated=True, detail="+".join(passed) or "open")
