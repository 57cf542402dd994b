"""Browser logins: a server-side session per login, never the API token in a cookie.

Opening the login link (``/?token=API_TOKEN``) creates a login: a random id that goes into
the ``shoal_login`` cookie (HttpOnly, SameSite=Strict) and is stored only as its SHA-256 in
the ``shoal-logins`` bucket (TTL'd, shared by every controller), so a copy of the bucket
opens nothing. Logging out deletes the entry, on every controller at once.

A cookie alone is not enough: browsers send a host's cookies to *every* port of that host,
so any program listening on another port of the controller's host (a terminal user's web
server) receives it. Each login therefore has a second half, its CSRF token, an HMAC of the
id under the controller's secret. It travels only in the URL fragment of the login redirect
(``#csrf=...``, never sent to a server), and the page keeps it in ``localStorage``, which
belongs to the controller's origin (scheme, host *and* port). Every API request that rides
on the cookie must carry it in ``X-Shoal-CSRF`` (WebSockets: ``?csrf=``); see auth.py.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from ..natsio import kv
from ..natsio.bus import NATS_ERRORS

if TYPE_CHECKING:
    from ..natsio.types import JetStreamContext, KeyValue

log = logging.getLogger(__name__)

BUCKET = "shoal-logins"
COOKIE = "shoal_login"
LEGACY_COOKIE = "shoal_token"  # held the API token itself before logins existed
CSRF_HEADER = "X-Shoal-CSRF"
CSRF_QUERY = "csrf"  # WebSockets cannot set headers
_ID_BYTES = 32


class Login(msgspec.Struct, frozen=True):
    created: float
    expires: float
    # The token the login was made with (its id, never the token) and its user. Each
    # request looks the token up again, so revoking it ends its logins too. Logins from
    # before users existed were all made with the admin token.
    token_id: str = "admin"
    user: str = "admin"


def csrf_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"shoal login csrf v1", hashlib.sha256).digest()


def csrf_token(key: bytes, login_id: str) -> str:
    return hmac.new(key, login_id.encode(), hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, login_id: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(csrf_token(key, login_id).encode(),
                                               given.encode())


def _stored_key(login_id: str) -> str:
    return hashlib.sha256(login_id.encode()).hexdigest()


def plausible_id(value: str) -> bool:
    """Shape check before touching the bucket (ids are token_urlsafe(32): 43 characters)."""
    return 20 <= len(value) <= 64 and value.replace("-", "").replace("_", "").isalnum()


class LoginStore:
    def __init__(self, secret: str, lifetime: float) -> None:
        self.lifetime = lifetime
        self.key = csrf_key(secret)
        self.kv: KeyValue | None = None

    async def start(self, js: JetStreamContext, replicas: int = 1) -> None:
        self.kv = await kv.ensure(js, BUCKET, ttl=self.lifetime, replicas=replicas)

    async def create(self, token_id: str = "admin", user: str = "admin") -> tuple[str, str]:
        """A new login: its id (for the cookie) and its CSRF token (for the page)."""
        if self.kv is None:
            raise web.HTTPServiceUnavailable(text="the controller is starting; try again")
        login_id = secrets.token_urlsafe(_ID_BYTES)
        now = time.time()
        await self.kv.put(_stored_key(login_id),
                          msgspec.json.encode(Login(now, now + self.lifetime, token_id, user)))
        return login_id, csrf_token(self.key, login_id)

    async def get(self, login_id: str) -> Login | None:
        """The login, if it exists and has not expired."""
        if self.kv is None or not plausible_id(login_id):
            return None
        found = await kv.get(self.kv, _stored_key(login_id))
        if found is None:  # never made, expired, or ended (deleted)
            return None
        try:
            login = msgspec.json.decode(found[0], type=Login)
        except msgspec.DecodeError:
            return None
        return login if login.expires > time.time() else None

    async def end(self, login_id: str) -> None:
        if self.kv is None or not plausible_id(login_id):
            return
        try:
            await kv.purge(self.kv, _stored_key(login_id))
        except NATS_ERRORS as e:
            log.warning("could not end a login: %s", e)


LOGINS: web.AppKey[LoginStore] = web.AppKey("shoal.logins", LoginStore)


async def logout(request: web.Request) -> web.Response:
    """``POST /api/v1/logout``: end this browser's login, on every controller."""
    store = request.app[LOGINS]
    login_id = request.get("login")
    if login_id:
        await store.end(login_id)
    resp = web.Response(status=204, headers={"Cache-Control": "no-store"})
    resp.del_cookie(COOKIE)
    return resp


def add_login_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/logout", logout)
