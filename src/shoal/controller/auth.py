"""HTTP authentication: a bearer token for the API, a login session for the browser, and
terminal capabilities that open one session's page and socket and nothing else.

A bearer token (or the token a login was made with) names a user and grants scopes
(apitokens.py); ``guarded`` is the one place the HTTP API checks them, against the
operation table (operations.py), and writes the audit trail (audit.py).

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
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..errors import Forbidden, ShoalError
from ..logic import tokens
from . import access, scopes
from .logins import COOKIE, CSRF_HEADER, CSRF_QUERY, LEGACY_COOKIE, csrf_ok
from .proxyauth import PROXY_TOKEN_ID, ProxyAuth
from .replies import error_json
from .scopes import Principal, Target

if TYPE_CHECKING:
    from ..config import ControllerConfig
    from .apitokens import TokenStore
    from .logins import Login, LoginStore
    from .server import Controller

__all__ = ["COOKIE", "TERMINAL_COOKIE", "auth_middleware", "error_json", "origin_ok"]

TERMINAL_COOKIE = "shoal_t_"  # + session id
ATTACH_QUERY = "attach"
# /api/v1/enroll: a join token in the body is the proof (controller/enroll.py).
PUBLIC_PATHS = frozenset({"/healthz", "/robots.txt", "/favicon.ico", "/api/v1/enroll"})
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
    cookie = tokens.verify(key, raw_cookie, time.time())
    if cookie is not None and cookie.kind == "cookie" and cookie.session == sid:
        if found.group(1):
            return TerminalScope(sid, from_link=False)
        if hmac.compare_digest(request.query.get(ATTACH_QUERY, ""),
                               attach_key(key, raw_cookie)):
            return TerminalScope(sid, from_link=False)
        return None  # a cookie alone may have been received by another port of this host
    link = tokens.verify(key, request.query.get("token", ""), time.time())
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
    proxy = ProxyAuth.from_config(cfg)  # None unless proxy_user_header is set

    def login_principal(store: TokenStore, login: Login | None,
                        proxied: str | None) -> Principal | None:
        """Who a login is, while it holds: its token's user while the token is valid; a
        proxy login while the trusted proxy still names the same user."""
        if login is None:
            return None
        if login.token_id == PROXY_TOKEN_ID:
            if proxy is None or proxied != login.user:
                return None
            return proxy.principal(login.user)
        return store.by_id(login.token_id)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        store = _ctl(request).api_tokens
        login = request.query.get("token")
        principal = await store.authenticate(bearer_token(request))
        if principal is not None:
            return await guarded(request, handler, principal)
        if login is not None and request.method == "GET" and not path.startswith("/api/"):
            who = await store.authenticate(login)
            if who is not None:
                raise await _log_in(request, who)
        if cfg.public_terminals and path == "/terminal":
            return await handler(request)  # anyone may: no cookie is trusted here
        proxied = proxy.user(request) if proxy is not None else None
        login_id = request.cookies.get(COOKIE, "")
        refused: web.Response | None = None
        found = await logins.get(login_id) if login_id else None
        principal = login_principal(store, found, proxied)
        if principal is not None:  # a login whose token was revoked or expired is over
            refused = browser_refusal(request, logins.key, login_id, cfg.origins)
            if refused is None:
                request["login"] = login_id
                return await guarded(request, handler, principal)
        elif proxy is not None and proxied is not None and login is None \
                and request.method == "GET" and not path.startswith("/api/"):
            # A page through the trusted proxy: a login of its user (cookie and CSRF token),
            # never the header alone, which the browser's cross-site requests carry too.
            raise await _log_in(request, proxy.principal(proxied))
        scope = await terminal_scope(request, key, consume_link)
        if scope is not None:
            sid = scope.session
            if scope.from_link:
                # The page without the link, the attach key in the fragment (never sent).
                cookie = tokens.issue(key, sid, cfg.terminal_lifetime, time.time(), kind="cookie")
                target = request.rel_url.with_query(
                    {k: v for k, v in request.query.items() if k != "token"}).with_fragment(
                    f"{ATTACH_QUERY}={attach_key(key, cookie)}")
                resp = web.HTTPSeeOther(target, headers={"Cache-Control": "no-store"})
                resp.set_cookie(TERMINAL_COOKIE + sid, cookie, httponly=True,
                                samesite="Strict", secure=is_https(request, trusted),
                                max_age=int(cfg.terminal_lifetime))
                raise resp
            request["session_scope"] = sid
            if path.endswith("/attach"):  # a terminal capability: its own, narrow grant
                await _ctl(request).audit.record(access.entry(
                    None, client_address(request, trusted), "sessions.attach", [sid], 101,
                    "opened with a terminal link"))
            return await handler(request)
        if refused is not None:
            return refused
        if login is not None:
            return error_json(401, "this link is wrong, expired or already used: open "
                                   "/terminal for a new terminal")
        return error_json(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'"
                               " (the token is in $SHOAL_HOME/client.toml)")

    async def guarded(request: web.Request, handler: Handler,
                      principal: Principal) -> web.StreamResponse:
        """The one scope check of the HTTP API: the route's operation in the operation
        table, what it reaches, then the handler; state changes go to the audit trail."""
        request["principal"] = principal
        route = request.match_info.route
        template = route.resource.canonical if route.resource is not None else ""
        op = scopes.http_op(request.method, template)
        if op is None:  # no such route: aiohttp answers 404/405
            return await handler(request)
        rule = scopes.OPS[op]
        ctl = _ctl(request)
        source = client_address(request, trusted)
        reach = await _reach(request, op)
        try:
            targets = await access.authorize(ctl, principal, op, reach)
        except Forbidden as e:
            if not rule.reads:
                await ctl.audit.record(access.entry(principal, source, op, [], 403,
                                                    f"refused: {e.message}", reach))
            return error_json(403, e.message)
        except ShoalError as e:  # what it reaches cannot be read (e.g. no scope named)
            return error_json(e.status, e.message)
        if not rule.audit or rule.target is Target.RUN:  # a run is recorded by run_ws
            return await handler(request)
        if _is_websocket(request):  # recorded when it opens: it may stay open for hours
            await ctl.audit.record(access.entry(principal, source, op, targets, 101, "opened"))
            return await handler(request)
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            if rule.target is Target.SPEC and isinstance(resp, web.Response) and resp.body:
                targets = access.created(msgspec.json.decode(resp.body), targets)  # type: ignore[arg-type]
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            result = "ok" if status < 400 else "failed"
            await ctl.audit.record(access.entry(principal, source, op, targets, status,
                                                result, reach))

    async def _log_in(request: web.Request, who: Principal) -> web.HTTPFound:
        """Start a login and go to the same page without the token; the page learns the
        login's CSRF token from the fragment, which the browser never sends anywhere."""
        old = request.cookies.get(COOKIE, "")
        if old:
            await logins.end(old)  # logging in again replaces the login, never adds one
        login_id, csrf = await logins.create(who.token_id, who.user)
        await _ctl(request).audit.record(access.entry(
            who, client_address(request, trusted), "login", [], 302, "ok"))
        target = request.rel_url.with_query(
            {k: v for k, v in request.query.items() if k != "token"}).with_fragment(
            f"csrf={csrf}")
        resp = web.HTTPFound(target, headers={"Cache-Control": "no-store"})
        resp.set_cookie(COOKIE, login_id, httponly=True, samesite="Strict", path="/",
                        secure=is_https(request, trusted), max_age=int(logins.lifetime))
        resp.del_cookie(LEGACY_COOKIE)
        return resp

    return middleware


async def _reach(request: web.Request, op: str) -> access.Reach:
    """What the request names, for the scope check: a path's id or name, or the body."""
    target = scopes.OPS[op].target
    if target is Target.SESSION:
        return access.Reach(session=request.match_info.get("id"))
    if target is Target.NODE:
        return access.Reach(node=request.match_info.get("name"))
    if target in (Target.SPEC, Target.GRANTS) and request.can_read_body:
        try:
            data = msgspec.json.decode(await request.read())
        except (msgspec.DecodeError, web.HTTPException):
            return access.Reach()  # the handler refuses it, creating nothing
        return access.reach_of_body(op, data)
    return access.Reach()


def _ctl(request: web.Request) -> Controller:
    return request.app["controller"]  # type: ignore[no-any-return]


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
