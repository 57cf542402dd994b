"""Capability tokens for terminal links (pure; no I/O).

A token names one session and an expiry, signed with HMAC-SHA256 under a key derived from
the controller's secret, so any controller can check it without shared state. A link token
is good for one use within a short time (its nonce is recorded when used); the page then
holds a cookie token that lasts as long as the session may.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import msgspec


class Claims(msgspec.Struct, array_like=True, frozen=True):
    session: str
    expires: float
    kind: str  # "link" (in a URL, short, used once) or "cookie" (long)
    nonce: str = ""  # names a link, so that its first use can be recorded


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"shoal terminal tokens v1", hashlib.sha256).digest()


def issue(key: bytes, session: str, ttl: float, now: float, kind: str = "link") -> str:
    nonce = secrets.token_hex(8) if kind == "link" else ""
    claims = msgspec.msgpack.encode(Claims(session, now + ttl, kind, nonce))
    sig = hmac.new(key, claims, hashlib.sha256).digest()
    return f"{_b64(claims)}.{_b64(sig)}"


def verify(key: bytes, token: str, now: float) -> Claims | None:
    """The claims if the token is genuine and unexpired, else None."""
    try:
        body, sig = token.split(".", 1)
        claims_raw = _unb64(body)
        good = hmac.new(key, claims_raw, hashlib.sha256).digest()
        if not hmac.compare_digest(good, _unb64(sig)):
            return None
        claims = msgspec.msgpack.decode(claims_raw, type=Claims)
    except (ValueError, msgspec.DecodeError):
        return None
    if claims.expires < now:
        return None
    return claims
