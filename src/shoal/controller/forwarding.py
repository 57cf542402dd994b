"""What a request to a replica carries, and what of the answer goes back: pure rules, no I/O.

- The upstream target is the client's raw request target minus ``/s/NAME``, byte for byte
  (never decoded and re-encoded: ``%3F`` stays ``%3F``, ``%252e`` stays ``%252e``).
- Hop-by-hop headers (RFC 9110 section 7.6.1: the fixed list and every header named in
  ``Connection``) are dropped both ways.
- Shoal's credentials never reach a replica: no ``Authorization``, no ``shoal_*`` cookie.
  A replica may not set a ``shoal_*`` cookie either (cookies are per host, not per port,
  so such a cookie would reach the controller).
- ``X-Forwarded-*`` and ``Forwarded`` from the client are believed only from a trusted
  proxy; otherwise they are replaced with what this listener saw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 7.6.1 and the headers proxies have always treated so.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Recomputed by the client library for the new connection.
FRAMING = frozenset({"content-length", "host"})
CREDENTIALS = frozenset({"authorization"})
FORWARDING = frozenset({
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
    "x-forwarded-prefix", "x-real-ip",
})
WS_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "sec-websocket-accept",
})
SHOAL_COOKIE = re.compile(r"^(?:__host-|__secure-)?shoal_", re.IGNORECASE)
_TARGET = re.compile(r"^/s/([^/?#]*)(.*)$", re.DOTALL)


def split_target(raw: str) -> tuple[str, str] | None:
    """``/s/NAME/rest?q`` -> (NAME, ``/rest?q``), from the raw request target, untouched.
    ``/s/NAME`` and ``/s/NAME?q`` forward to ``/`` and ``/?q``."""
    found = _TARGET.match(raw)
    if found is None:
        return None
    name, rest = found.groups()
    return name, rest if rest.startswith("/") else "/" + rest


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Headers that ``Connection`` declares hop-by-hop for this one connection."""
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def without_shoal_cookies(header: str) -> str:
    parts = [p.strip() for p in header.split(";")]
    return "; ".join(p for p in parts if p and not SHOAL_COOKIE.match(p.split("=", 1)[0].strip()))


def upstream_headers(headers: CIMultiDictProxy[str], *, peer: str, trusted: Iterable[str],
                     host: str, scheme: str, prefix: str,
                     drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """The headers sent to a replica for a client request with these ``headers``."""
    named = connection_named(headers)
    from_proxy = peer in set(trusted)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if (lk in HOP_BY_HOP or lk in FRAMING or lk in CREDENTIALS or lk in named
                or lk in drop or lk in FORWARDING):
            continue
        if lk == "cookie":
            v = without_shoal_cookies(v)
            if not v:
                continue
        out.add(k, v)
    prior = ", ".join(headers.getall("X-Forwarded-For", [])) if from_proxy else ""
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Host"] = (from_proxy and headers.get("X-Forwarded-Host")) or host
    out["X-Forwarded-Proto"] = (from_proxy and headers.get("X-Forwarded-Proto")) or scheme
    out["X-Forwarded-Prefix"] = prefix
    if from_proxy and "Forwarded" in headers:
        out["Forwarded"] = ", ".join(headers.getall("Forwarded"))
    return out


def answer_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The replica's answer headers that go back to the client."""
    named = connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in FRAMING or lk in named:
            continue
        if lk == "set-cookie" and SHOAL_COOKIE.match(v.split("=", 1)[0].strip()):
            continue
        out.add(k, v)
    return out
