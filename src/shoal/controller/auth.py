"""HTTP authentication: a bearer token for the API, a cookie for the browser, and terminal
capabilities that open one session's page and socket and nothing else.

``/?token=...`` (the login URL ``shoal up`` prints) sets an HttpOnly cookie and redirects to
the same page without the token, so it does not linger in the address bar or in history.
A terminal link (``/t/ID?token=LINK``) trades its short-lived token for a cookie scoped to that
session. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import tokens

COOKIE = "shoal_token"
TERMINAL_COOKIE = "shoal_t_"  # + session id
PUBLIC_PATHS = frozenset({"/healthz", "/robots.txt", "/favicon.ico"})
# Static assets (the page code and xterm.js) hold nothing secret.
# /s/NAME/... is a service's own public traffic (redirected or proxied to its replicas,
# which do their own auth); the shoal token must not be needed for it, nor sent along.
PUBLIC_PREFIXES = ("/static/", "/s/")
_TERMINAL_PATHS = re.compile(r"^/(?:t/([A-Za-z0-9_-]{1,64})|"
                             r"api/v1/sessions/([A-Za-z0-9_-]{1,64})/attach)$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def nearest_untrusted(peer: str, forwarded_for: str, trusted: list[str]) -> str:
    """The client's address: the peer, or behind a trusted proxy the nearest untrusted
    address in X-Forwarded-For (a client can forge the rest of that header)."""
    if peer not in trusted:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",")]
    for hop in reversed([h for h in hops if h]):
        if hop not in trusted:
            return hop
    return peer


def client_address(request: web.Request, trusted: list[str]) -> str:
    return nearest_untrusted(request.remote or "", request.headers.get("X-Forwarded-For", ""),
                             trusted)


def is_https(request: web.Request, trusted: list[str]) -> bool:
    """TLS from the browser's view, also when a trusted proxy terminates it."""
    if request.secure:
        return True
    return (request.remote or "") in trusted and \
        request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def request_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE, "")


def token_ok(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def error_json(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


ConsumeLink = Callable[[str], Awaitable[bool]]


async def terminal_scope(request: web.Request, key: bytes,
                         consume_link: ConsumeLink | None) -> str | None:
    """The session a terminal credential on this request opens, if any and if valid: the
    session's cookie, or on its page a link token not used before."""
    found = _TERMINAL_PATHS.match(request.path)
    if found is None:
        return None
    sid = found.group(1) or found.group(2)
    cookie = tokens.verify(key, request.cookies.get(TERMINAL_COOKIE + sid, ""))
    if cookie is not None and cookie.kind == "cookie" and cookie.session == sid:
        return sid
    link = tokens.verify(key, request.query.get("token", ""))
    if link is None or link.kind != "link" or link.session != sid or not found.group(1):
        return None
    if consume_link is not None and not await consume_link(link.nonce):
        return None  # used before: a link opens a terminal once
    return sid


def auth_middleware(token: str, public_terminals: bool = False,
                    terminal_lifetime: float = 14400.0,
                    consume_link: ConsumeLink | None = None,
                    trusted_proxies: list[str] | None = None) -> Callable[..., Awaitable[Any]]:
    key = tokens.derive_key(token)
    trusted = trusted_proxies or []

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        login = request.query.get("token")
        if token_ok(request_token(request), token):
            return await handler(request)
        if login is not None and request.method == "GET" and token_ok(login, token) \
                and not path.startswith("/api/"):
            resp = web.HTTPFound(request.rel_url.with_query(
                {k: v for k, v in request.query.items() if k != "token"}))
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                            secure=is_https(request, trusted), max_age=30 * 86400)
            raise resp
        if public_terminals and path == "/terminal":
            return await handler(request)
        sid = await terminal_scope(request, key, consume_link)
        if sid is not None:
            request["session_scope"] = sid
            response = await handler(request)
            if path.startswith("/t/") and not response.prepared:
                cookie = tokens.issue(key, sid, terminal_lifetime, kind="cookie")
                response.set_cookie(TERMINAL_COOKIE + sid, cookie, httponly=True,
                                    samesite="Strict", secure=is_https(request, trusted),
                                    max_age=int(terminal_lifetime))
            return response
        if login is not None:
            return error_json(401, "this link is wrong, expired or already used: open "
                                   "/terminal for a new terminal")
        return error_json(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'"
                               " (the token is in $SHOAL_HOME/client.toml)")

    return middleware


def origin_ok(request: web.Request, extra: list[str]) -> bool:
    """WebSocket origin check: same host as the request, or explicitly allowed.

    Clients that are not browsers send no Origin header and authenticate with the bearer
    token; a browser always sends one, so a foreign page cannot ride on our cookie.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin in extra:
        return True
    host = request.headers.get("Host", "")
    return origin in (f"http://{host}", f"https://{host}")
