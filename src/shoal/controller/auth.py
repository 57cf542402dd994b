"""HTTP authentication: a bearer token for the API, a login session for the browser, and
terminal capabilities that open one session's page and socket and nothing else.

``/?token=...`` (the login URL ``shoal up`` prints) starts a login (logins.py): the cookie
holds the login's random id, never the token, and the redirect hands the page the login's
CSRF token in the URL fragment. A request that rides on the login cookie is trusted only
with that CSRF token (``X-Shoal-CSRF``) on every API call; a state change must also come from
our own origin (``Origin``, else ``Sec-Fetch-Site``) with a JSON body (else 415). Bearer
clients (CLI, Python client) send no cookie and none of this applies to them.

A terminal link (``/t/ID?token=LINK``) trades its short-lived token for a cookie scoped to
that session and redirects to the page with the terminal's attach key in the URL fragment.
The cookie opens the page; the socket needs the attach key as well (``?attach=``), because
the browser sends the cookie to every port of this host, where another visitor's server may
be listening, while the key lives only in this origin's storage. Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import tokens
from .logins import COOKIE, CSRF_HEADER, CSRF_QUERY, LEGACY_COOKIE, csrf_ok

if TYPE_CHECKING:
    from ..config import ControllerConfig
    from .logins import LoginStore

__all__ = ["COOKIE", "TERMINAL_COOKIE", "auth_middleware", "error_json", "origin_ok"]

TERMINAL_COOKIE = "shoal_t_"  # + session id
ATTACH_QUERY = "attach"
PUBLIC_PATHS = frozenset({"/healthz", "/robots.txt", "/favicon.ico"})
# Static assets (the page code and xterm.js) hold nothing secret.
# /s/NAME/... is a service's own public traffic (redirected or proxied to its replicas,
# which do their own auth); the shoal token must not be needed for it, nor sent along.
PUBLIC_PREFIXES = ("/static/", "/s/")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
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


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return ""


def token_ok(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def error_json(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


ConsumeLink = Callable[[str], Awaitable[bool]]


def attach_key(key: bytes, cookie: str) -> str:
    """The terminal socket's second factor: bound to the cookie, known only to its page."""
    return hmac.new(key, b"attach\0" + cookie.encode(), "sha256").hexdigest()


class TerminalScope:
    """The session a terminal credential opens, and whether it came from a link."""

    def __init__(self, session: str, from_link: bool) -> None:
        self.session = session
        self.from_link = from_link


async def terminal_scope(request: web.Request, key: bytes,
                         consume_link: ConsumeLink | None) -> TerminalScope | None:
    """The session a terminal credential on this request opens, if any and if valid: on the
    page, the session's cookie or a link token not used before; on the socket, the cookie
    and its attach key."""
    found = _TERMINAL_PATHS.match(request.path)
    if found is None:
        return None
    sid = found.group(1) or found.group(2)
    raw_cookie = request.cookies.get(TERMINAL_COOKIE + sid, "")
    cookie = tokens.verify(key, raw_cookie)
    if cookie is not None and cookie.kind == "cookie" and cookie.session == sid:
        if found.group(1):
            return TerminalScope(sid, from_link=False)
        if hmac.compare_digest(request.query.get(ATTACH_QUERY, ""),
                               attach_key(key, raw_cookie)):
            return TerminalScope(sid, from_link=False)
        return None  # a cookie alone may have been received by another port of this host
    link = tokens.verify(key, request.query.get("token", ""))
    if link is None or link.kind != "link" or link.session != sid or not found.group(1):
        return None
    if consume_link is not None and not await consume_link(link.nonce):
        return None  # used before: a link opens a terminal once
    return TerminalScope(sid, from_link=True)


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def browser_refusal(request: web.Request, csrf_key: bytes, login_id: str,
                    extra_origins: list[str]) -> web.Response | None:
    """Why a request on the login cookie must be refused, or None. Pages (GET of HTML) need
    only the cookie; everything under /api/ needs the CSRF token; state changes and
    WebSockets need our own origin as well, and state changes a JSON body."""
    api = request.path.startswith("/api/")
    safe = request.method in SAFE_METHODS
    if safe and not api:
        return None
    if (not safe or _is_websocket(request)) and not same_origin(request, extra_origins):
        return error_json(403, "refused: this request rides on the browser's login cookie "
                               "but does not come from the controller's own pages (Origin "
                               f"{request.headers.get('Origin', 'missing')!r})")
    given = request.headers.get(CSRF_HEADER, "")
    if not given and _is_websocket(request):
        given = request.query.get(CSRF_QUERY, "")
    if not csrf_ok(csrf_key, login_id, given):
        return error_json(403, f"refused: a browser request needs the {CSRF_HEADER} header "
                               "that the dashboard sends (reload the page, or log in again "
                               "with the link `shoal up` printed); scripts use "
                               "'Authorization: Bearer TOKEN'")
    if not safe and request.content_type != "application/json":
        return error_json(415, "send the body as JSON, with 'Content-Type: application/json'")
    return None


def auth_middleware(cfg: ControllerConfig, logins: LoginStore,
                    consume_link: ConsumeLink | None = None) -> Callable[..., Awaitable[Any]]:
    token = cfg.token
    key = tokens.derive_key(token)
    trusted = cfg.trusted_proxies

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        login = request.query.get("token")
        if token_ok(bearer_token(request), token):
            return await handler(request)
        if login is not None and request.method == "GET" and token_ok(login, token) \
                and not path.startswith("/api/"):
            raise await _log_in(request)
        if cfg.public_terminals and path == "/terminal":
            return await handler(request)  # anyone may: no cookie is trusted here
        login_id = request.cookies.get(COOKIE, "")
        refused: web.Response | None = None
        if login_id and await logins.valid(login_id):
            refused = browser_refusal(request, logins.key, login_id, cfg.origins)
            if refused is None:
                request["login"] = login_id
                return await handler(request)
        scope = await terminal_scope(request, key, consume_link)
        if scope is not None:
            sid = scope.session
            if scope.from_link:
                # The page without the link, the attach key in the fragment (never sent).
                cookie = tokens.issue(key, sid, cfg.terminal_lifetime, kind="cookie")
                target = request.rel_url.with_query(
                    {k: v for k, v in request.query.items() if k != "token"}).with_fragment(
                    f"{ATTACH_QUERY}={attach_key(key, cookie)}")
                resp = web.HTTPSeeOther(target, headers={"Cache-Control": "no-store"})
                resp.set_cookie(TERMINAL_COOKIE + sid, cookie, httponly=True,
                                samesite="Strict", secure=is_https(request, trusted),
                                max_age=int(cfg.terminal_lifetime))
                raise resp
            request["session_scope"] = sid
            return await handler(request)
        if refused is not None:
            return refused
        if login is not None:
            return error_json(401, "this link is wrong, expired or already used: open "
                                   "/terminal for a new terminal")
        return error_json(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'"
                               " (the token is in $SHOAL_HOME/client.toml)")

    async def _log_in(request: web.Request) -> web.HTTPFound:
        """Start a login and go to the same page without the token; the page learns the
        login's CSRF token from the fragment, which the browser never sends anywhere."""
        old = request.cookies.get(COOKIE, "")
        if old:
            await logins.end(old)  # logging in again replaces the login, never adds one
        login_id, csrf = await logins.create()
        target = request.rel_url.with_query(
            {k: v for k, v in request.query.items() if k != "token"}).with_fragment(
            f"csrf={csrf}")
        resp = web.HTTPFound(target, headers={"Cache-Control": "no-store"})
        resp.set_cookie(COOKIE, login_id, httponly=True, samesite="Strict", path="/",
                        secure=is_https(request, trusted), max_age=int(logins.lifetime))
        resp.del_cookie(LEGACY_COOKIE)
        return resp

    return middleware


def same_origin(request: web.Request, extra: list[str]) -> bool:
    """A state change from a browser page: ``Origin`` is ours (or explicitly allowed); a
    browser that sends no Origin must say ``Sec-Fetch-Site: same-origin``."""
    origin = request.headers.get("Origin")
    if origin is None:
        return request.headers.get("Sec-Fetch-Site") == "same-origin"
    return origin in extra or origin in _own_origins(request)


def _own_origins(request: web.Request) -> tuple[str, str]:
    host = request.headers.get("Host", "")
    return f"http://{host}", f"https://{host}"


def origin_ok(request: web.Request, extra: list[str]) -> bool:
    """WebSocket origin check: same host as the request, or explicitly allowed.

    Clients that are not browsers send no Origin header and authenticate with the bearer
    token; a browser always sends one, so a foreign page cannot ride on our cookie.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in extra or origin in _own_origins(request)
