"""Capability tokens for terminal links (pure; no I/O).

A token names one session and an expiry, signed with HMAC-SHA256 under a key derived from
the controller's secret, so any controller can check it without shared state. A link token
is short-lived (until first use); the page then holds a cookie token that lasts as long as
the session may.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import msgspec


class _Claims(msgspec.Struct, array_like=True):
    session: str
    expires: float
    kind: str  # "link" (in a URL, short) or "cookie" (long)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"shoal terminal tokens v1", hashlib.sha256).digest()


def issue(key: bytes, session: str, ttl: float, kind: str = "link",
          now: float | None = None) -> str:
    claims = msgspec.msgpack.encode(_Claims(session, (now or time.time()) + ttl, kind))
    sig = hmac.new(key, claims, hashlib.sha256).digest()
    return f"{_b64(claims)}.{_b64(sig)}"


def verify(key: bytes, token: str, now: float | None = None) -> tuple[str, str] | None:
    """(session id, kind) if the token is genuine and unexpired, else None."""
    try:
        body, sig = token.split(".", 1)
        claims_raw = _unb64(body)
        good = hmac.new(key, claims_raw, hashlib.sha256).digest()
        if not hmac.compare_digest(good, _unb64(sig)):
            return None
        claims = msgspec.msgpack.decode(claims_raw, type=_Claims)
    except (ValueError, msgspec.DecodeError):
        return None
    if claims.expires < (now or time.time()):
        return None
    return claims.session, claims.kind
