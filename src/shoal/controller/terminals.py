"""``/terminal``: one URL that hands each visitor a fresh terminal on the best node.

``GET /terminal`` serves a page whose script POSTs to ``/terminal`` (a crawler following links
never creates anything). The POST either creates a terminal session and answers with its page
URL carrying a short-lived link token for that session only, or, when every slot is taken,
answers 503 with ``Retry-After`` and the visitor's place in a queue (or a redirect to the
operator's parking URL). The queue lives in a TTL'd key-value bucket, so every controller
sees the same line; a visitor who stops polling drops out of it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import msgspec
import nats.js.errors
from aiohttp import web
from nats.js.api import KeyValueConfig, StorageType

from .. import messages as m
from .. import tokens
from ..bus import watch_bucket
from ..errors import NoCapacityError, ShoalError
from ..web import STATIC_DIR
from .auth import client_address, error_json

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from .server import Controller

log = logging.getLogger(__name__)

QUEUE_BUCKET = "shoal-queue"
LINKS_BUCKET = "shoal-used-links"  # nonces of terminal links already used, for LINK_TTL
TICKET_TTL = 15.0  # a waiting visitor who has not polled for this long has left
POLL_EVERY = 2
LINK_TTL = 120.0


class _Ticket(msgspec.Struct):
    created: float


class _PoolRequest(msgspec.Struct, forbid_unknown_fields=True):
    ticket: str = ""


class RateLimiter:
    """Token bucket per client address: ``rate`` creations per minute, bursts up to that."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.refill = per_minute / 60.0
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        level, last = self.buckets.get(key, (self.capacity, now))
        level = min(self.capacity, level + (now - last) * self.refill)
        if level < 1:
            self.buckets[key] = (level, now)
            return False
        self.buckets[key] = (level - 1, now)
        if len(self.buckets) > 100_000:  # forget idle addresses rather than grow forever
            self.buckets.clear()
        return True


class TerminalPool:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.cfg = ctl.cfg
        self.key = tokens.derive_key(ctl.cfg.token)
        self.limiter = RateLimiter(ctl.cfg.terminal_rate)
        self.kv: KeyValue | None = None
        self.used_links: KeyValue | None = None
        self.tickets: dict[str, tuple[float, float]] = {}  # id -> (created, seen monotonic)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        js = self.ctl.js
        try:
            self.kv = await js.key_value(QUEUE_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            self.kv = await js.create_key_value(config=KeyValueConfig(
                bucket=QUEUE_BUCKET, ttl=TICKET_TTL, history=1, storage=StorageType.MEMORY,
                replicas=self.ctl.replicas))
        try:
            self.used_links = await js.key_value(LINKS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            self.used_links = await js.create_key_value(config=KeyValueConfig(
                bucket=LINKS_BUCKET, ttl=LINK_TTL, history=1, storage=StorageType.MEMORY,
                replicas=self.ctl.replicas))
        self._task = asyncio.create_task(watch_bucket(self.kv, self._apply, what="queue"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def consume_link(self, nonce: str) -> bool:
        """Record a link's first use; False if it was used before (on any controller)."""
        if self.used_links is None or not nonce:
            return False
        try:
            await self.used_links.create(nonce, b"1")
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.tickets.pop(key, None)
        else:
            t = msgspec.json.decode(value, type=_Ticket)
            self.tickets[key] = (t.created, time.monotonic())

    # ------------------------------------------------------------------ queue

    def position(self, ticket: str, created: float) -> int:
        """1-based place in line among visitors still polling."""
        now = time.monotonic()
        ahead = sum(1 for tid, (c, seen) in self.tickets.items()
                    if tid != ticket and now - seen < TICKET_TTL and (c, tid) < (created, ticket))
        return ahead + 1

    def free_slots(self) -> int:
        return sum(max(0, n.capacity - n.sessions) for n in self.ctl.registry.snapshot().values()
                   if n.state == "ready")

    def warning(self) -> str | None:
        plain = [n.name for n in self.ctl.registry.snapshot().values()
                 if n.state == "ready" and not n.isolation]
        if plain:
            return ("terminals on " + ", ".join(plain) + " run as the agent's own user (the "
                    "agent is not root, so it cannot make throwaway users)")
        return None

    def spec(self) -> m.SessionSpec:
        c = self.cfg
        return m.SessionSpec(
            name="terminal", command=list(c.terminal_command), tty=True, user="ephemeral",
            detach_timeout=c.terminal_detach_timeout, idle_timeout=c.terminal_idle_timeout,
            timeout=c.terminal_lifetime, labels={"pool": "terminal"},
            limits=m.Limits(processes=256, open_files=1024, memory_mb=2048))

    async def enter(self, request: web.Request) -> web.Response:
        """POST /terminal: a terminal now, or a place in the queue."""
        form = request.content_type == "application/x-www-form-urlencoded"
        if form:
            data = await request.post()
            req = _PoolRequest(ticket=str(data.get("ticket", "")))
        else:
            raw = await request.read()
            try:
                req = msgspec.json.decode(raw or b"{}", type=_PoolRequest)
            except msgspec.DecodeError as e:
                return error_json(400, f"bad request: {e}")
        if len(req.ticket) > 64:
            return error_json(400, "bad ticket")
        ticket = req.ticket or secrets.token_urlsafe(12)
        created = self.tickets.get(ticket, (time.time(), 0.0))[0]
        assert self.kv is not None
        await self.kv.put(ticket, msgspec.json.encode(_Ticket(created)))
        self.tickets[ticket] = (created, time.monotonic())
        place = self.position(ticket, created)
        if place <= self.free_slots():
            peer = client_address(request, self.cfg.trusted_proxies) or "?"
            if not self.limiter.allow(peer):
                return self._answer(form, 429, {"state": "limited", "retry_after": 20,
                                                "message": "too many terminals from your "
                                                           "address; wait a little"})
            try:
                record, _ = await self.ctl.sessions.create(self.spec())
            except ShoalError as e:
                return error_json(e.status, e.message)
            if record.state != "failed":
                await self._drop(ticket)
                link = tokens.issue(self.key, record.id, LINK_TTL)
                url = f"/t/{record.id}?token={link}"
                return self._answer(form, 201, {"state": "ready", "session": record.id,
                                                "url": url})
        if self.cfg.terminal_parking_url:
            await self._drop(ticket)
            return self._answer(form, 503, {"state": "parked",
                                            "url": self.cfg.terminal_parking_url})
        return self._answer(form, 503, {
            "state": "waiting", "ticket": ticket, "position": place,
            "retry_after": POLL_EVERY,
            "message": f"every terminal is taken; you are number {place} in line"})

    async def _drop(self, ticket: str) -> None:
        self.tickets.pop(ticket, None)
        assert self.kv is not None
        try:
            await self.kv.delete(ticket)
        except Exception:
            pass

    def _answer(self, form: bool, status: int, body: dict[str, Any]) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if status in (503, 429):
            headers["Retry-After"] = str(body.get("retry_after", POLL_EVERY))
        if not form:
            return web.json_response(body, status=status, headers=headers)
        if body["state"] in ("ready", "parked"):
            raise web.HTTPSeeOther(body["url"], headers=headers)
        ticket = body.get("ticket", "")
        html = (f"<!doctype html><meta charset=utf-8><title>shoal: waiting</title>"
                f"<p>{body.get('message', '')}</p><form method=post action=/terminal>"
                f"<input type=hidden name=ticket value='{ticket}'>"
                f"<button>Try again</button></form>")
        return web.Response(text=html, status=status, content_type="text/html", headers=headers)


# ---------------------------------------------------------------------- pages

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "Cache-Control": "no-store",
}


def page(name: str) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / name, headers=PAGE_HEADERS)


async def pool_page(request: web.Request) -> web.StreamResponse:
    return page("pool.html")


async def pool_enter(request: web.Request) -> web.StreamResponse:
    pool: TerminalPool = request.app["controller"].terminals
    try:
        return await pool.enter(request)
    except NoCapacityError as e:
        return error_json(503, e.message)


async def terminal_page(request: web.Request) -> web.StreamResponse:
    return page("terminal.html")


async def dashboard_page(request: web.Request) -> web.StreamResponse:
    return page("dashboard.html")


async def terminal_info(request: web.Request) -> web.Response:
    pool: TerminalPool = request.app["controller"].terminals
    return web.json_response({"public": pool.cfg.public_terminals, "warning": pool.warning()})


async def robots(request: web.Request) -> web.Response:
    return web.Response(text="User-agent: *\nDisallow: /\n")


def add_terminal_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", dashboard_page)
    r.add_get("/terminal", pool_page)
    r.add_post("/terminal", pool_enter)
    r.add_get("/t/{id}", terminal_page)
    r.add_get("/api/v1/terminal/info", terminal_info)
    r.add_get("/robots.txt", robots)
    r.add_static("/static/", STATIC_DIR, append_version=False)
