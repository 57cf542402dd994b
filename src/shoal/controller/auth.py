"""HTTP authentication: a bearer token for the API, a cookie for the browser.

``/?token=...`` (the login URL ``shoal up`` prints) sets an HttpOnly cookie and redirects to
the same page without the token, so it does not linger in the address bar or in history.
Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

COOKIE = "shoal_token"
PUBLIC_PATHS = frozenset({"/healthz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE, "")


def token_ok(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def error_json(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def auth_middleware(token: str):  # type: ignore[no-untyped-def]
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        login = request.query.get("token")
        if login is not None and request.method == "GET" and not request.path.startswith("/api/"):
            if not token_ok(login, token):
                return error_json(401, "the login token is wrong; use the URL shoal up printed")
            resp = web.HTTPFound(request.rel_url.with_query(
                {k: v for k, v in request.query.items() if k != "token"}))
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                            secure=request.secure, max_age=30 * 86400)
            raise resp
        if not token_ok(request_token(request), token):
            return error_json(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'"
                                   " (the token is in $SHOAL_HOME/client.toml)")
        return await handler(request)

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
