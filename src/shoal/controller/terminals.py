"""``/terminal``: one URL that hands each visitor a fresh terminal on the best node.

``GET /terminal`` serves a page whose script POSTs to ``/terminal`` (a crawler following links
never creates anything). The POST either creates a terminal session and answers with its page
URL carrying a short-lived link token for that session only, or, when every slot is taken,
answers 503 with ``Retry-After`` and the visitor's place in a queue (or a redirect to the
operator's parking URL). The queue lives in a TTL'd key-value bucket, so every controller
sees the same line; a visitor who stops polling drops out of it.

Fairness: a client (an IPv4 address, or an IPv6 /64, which one subscriber usually holds
whole) holds at most ``terminal_tickets`` places in line, and the rate limit is checked
before the line: a rate-limited visitor leaves it, so a few polling clients cannot jam it.
Only tickets this pool issued hold a place; any other is answered with a fresh one.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..config import ControllerConfig
from ..errors import NoCapacityError, ShoalError
from ..logic import tokens
from ..natsio import kv, outputlog
from ..natsio.bus import watch_bucket
from ..natsio.types import JetStreamContext, KeyValue
from ..system.tasks import end_tasks
from ..web import STATIC_DIR
from ..wire import messages as m
from .auth import client_address, error_json
from .headers import PAGE

if TYPE_CHECKING:
    from .registry import NodeRegistry
    from .sessions import SessionService

log = logging.getLogger(__name__)

QUEUE_BUCKET = "shoal-queue"
LINKS_BUCKET = "shoal-used-links"  # nonces of terminal links already used, for LINK_TTL
TICKET_TTL = 15.0  # a waiting visitor who has not polled for this long has left
POLL_EVERY = 2
LINK_TTL = 120.0
TICKET_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what secrets.token_urlsafe makes
LIMITER_KEYS = 100_000


class _Ticket(msgspec.Struct):
    created: float
    client: str = ""  # client_key() of who holds it, for the per-client cap


class _PoolRequest(msgspec.Struct, forbid_unknown_fields=True):
    ticket: str = ""


def client_key(address: str) -> str:
    """Who a client is, for limits: its IPv4 address, or its IPv6 /64 (one subscriber's
    network; a whole address would let one host take 2**64 keys)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RateLimiter:
    """Token bucket per client key: ``per_minute`` creations a minute, bursts up to that.

    Bounded without ever forgetting everyone at once: past ``max_keys`` the least recently
    seen keys go first, and a key idle long enough to be full again loses nothing."""

    def __init__(self, per_minute: int, max_keys: int = LIMITER_KEYS) -> None:
        self.capacity = float(per_minute)
        self.refill = per_minute / 60.0
        self.max_keys = max_keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        level, last = self.buckets.get(key, (self.capacity, now))
        return min(self.capacity, level + (now - last) * self.refill)

    def ready(self, key: str, now: float | None = None) -> bool:
        """Whether ``key`` may create one now (nothing is spent)."""
        now = time.monotonic() if now is None else now
        return self._level(key, now) >= 1

    def allow(self, key: str, now: float | None = None) -> bool:
        """Spend one creation for ``key`` if it has one."""
        now = time.monotonic() if now is None else now
        level = self._level(key, now)
        ok = level >= 1
        self.buckets[key] = (level - 1 if ok else level, now)
        self.buckets.move_to_end(key)
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return ok

    def refund(self, key: str, now: float | None = None) -> None:
        """Give back a creation that did not happen (no node could take it)."""
        now = time.monotonic() if now is None else now
        if key in self.buckets:
            self.buckets[key] = (min(self.capacity, self._level(key, now) + 1), now)


class TerminalPool:
    """Built by ``open`` (which binds its buckets): nothing in it waits to be set."""

    def __init__(self, cfg: ControllerConfig, queue: KeyValue, used_links: KeyValue,
                 registry: NodeRegistry, sessions: SessionService) -> None:
        self.cfg = cfg
        self.registry = registry
        self.sessions = sessions
        self.key = tokens.derive_key(cfg.token)
        self.limiter = RateLimiter(cfg.terminal_rate)
        self.holders: dict[str, str] = {}  # ticket -> client key
        self.kv = queue
        self.used_links = used_links
        self.tickets: dict[str, tuple[float, float]] = {}  # id -> (created, seen monotonic)
        self._task = asyncio.create_task(watch_bucket(self.kv, self._apply, what="queue"))

    @classmethod
    async def open(cls, cfg: ControllerConfig, js: JetStreamContext, replicas: int,
                   registry: NodeRegistry, sessions: SessionService) -> TerminalPool:
        queue = await kv.ensure(js, QUEUE_BUCKET, ttl=TICKET_TTL, memory=True,
                                replicas=replicas)
        links = await kv.ensure(js, LINKS_BUCKET, ttl=LINK_TTL, memory=True,
                                replicas=replicas)
        return cls(cfg, queue, links, registry, sessions)

    async def stop(self) -> None:
        await end_tasks([self._task])

    async def consume_link(self, nonce: str) -> bool:
        """Record a link's first use; False if it was used before (on any controller)."""
        if not nonce:
            return False
        return await kv.create(self.used_links, nonce, b"1") is not None

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.tickets.pop(key, None)
            self.holders.pop(key, None)
        else:
            t = msgspec.json.decode(value, type=_Ticket)
            self.tickets[key] = (t.created, time.monotonic())
            self.holders[key] = t.client

    # ------------------------------------------------------------------ queue

    def position(self, ticket: str, created: float) -> int:
        """1-based place in line among visitors still polling."""
        now = time.monotonic()
        ahead = sum(1 for tid, (c, seen) in self.tickets.items()
                    if tid != ticket and now - seen < TICKET_TTL and (c, tid) < (created, ticket))
        return ahead + 1

    def held_by(self, client: str) -> int:
        """Live places in line that ``client`` holds."""
        now = time.monotonic()
        return sum(1 for tid, who in self.holders.items()
                   if who == client and now - self.tickets.get(tid, (0.0, -TICKET_TTL))[1]
                   < TICKET_TTL)

    async def _known(self, ticket: str) -> float | None:
        """When a ticket this pool issued was created, or None (unknown or expired). Asks
        the bucket when this controller has not seen it yet (it was made elsewhere)."""
        if not ticket:
            return None
        if ticket in self.tickets:
            return self.tickets[ticket][0]
        found = await kv.get(self.kv, ticket)
        if found is None:
            return None
        return msgspec.json.decode(found[0], type=_Ticket).created

    def free_slots(self) -> int:
        return sum(max(0, n.capacity - n.sessions) for n in self.registry.snapshot().values()
                   if n.state == "ready")

    def warning(self) -> str | None:
        if self.cfg.terminal_image:
            able = [n for n in self.registry.snapshot().values()
                    if n.state == "ready" and n.containers]
            return None if able else ("no ready node can run containers for terminals "
                                      "(`shoal nodes` shows which can)")
        plain = [n.name for n in self.registry.snapshot().values()
                 if n.state == "ready" and not n.isolation]
        if plain:
            return ("terminals on " + ", ".join(plain) + " run as the agent's own user (the "
                    "agent is not root, so it cannot make throwaway users)")
        loose = [n.name for n in self.registry.snapshot().values()
                 if n.state == "ready" and n.network in ("unenforced", "open")]
        if loose:
            return ("terminals on " + ", ".join(loose) + " can reach the node's NATS, "
                    "controller and other sessions' ports (no network policy in force)")
        return None

    def spec(self) -> m.SessionSpec:
        c = self.cfg
        # With terminal_image, a container (no network: not the node's, nor anyone's) in
        # place of a throwaway user; the pool (queue, timeouts, replay) is the same.
        isolation: dict[str, Any] = {"user": "ephemeral"}
        if c.terminal_image:
            isolation = {"runtime": "container", "image": c.terminal_image, "network": "none"}
        # The id prefix sends the output to the terminals' own stream (outputlog.py).
        return m.SessionSpec(
            id=outputlog.TERMINAL_PREFIX + secrets.token_hex(6), output_cap=c.terminal_output_cap,
            name="terminal", command=list(c.terminal_command), tty=True,
            detach_timeout=c.terminal_detach_timeout, idle_timeout=c.terminal_idle_timeout,
            timeout=c.terminal_lifetime, labels={"pool": "terminal"},
            limits=m.Limits(processes=256, open_files=1024, memory_mb=2048), **isolation)

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
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                return error_json(400, f"bad request: {e}; send {{\"ticket\": \"...\"}} "
                                       "or an empty body")
        if req.ticket and not TICKET_SHAPE.fullmatch(req.ticket):
            return error_json(400, "bad ticket: send back the ticket this server gave you, "
                                   "or none to join the line")
        client = client_key(client_address(request, self.cfg.trusted_proxies) or "?")
        if not self.limiter.ready(client):  # before the line: a limited visitor leaves it
            if req.ticket:
                await self._drop(req.ticket)
            return self._limited(form, "too many terminals from your address; wait a little")
        created = await self._known(req.ticket)
        ticket = req.ticket
        if created is None:
            if self.held_by(client) >= self.cfg.terminal_tickets:
                return self._limited(form, "your address already holds "
                                           f"{self.cfg.terminal_tickets} places in line; "
                                           "keep polling with your ticket")
            ticket, created = secrets.token_urlsafe(12), time.time()
        await self.kv.put(ticket, msgspec.json.encode(_Ticket(created, client)))
        self.tickets[ticket] = (created, time.monotonic())
        self.holders[ticket] = client
        place = self.position(ticket, created)
        if place <= self.free_slots():
            if not self.limiter.allow(client):
                await self._drop(ticket)
                return self._limited(form, "too many terminals from your address; wait a "
                                           "little")
            try:
                record, _ = await self.sessions.create(self.spec(), terminal=True)
            except ShoalError as e:
                self.limiter.refund(client)
                return error_json(e.status, e.message)
            if record.state == "failed":  # every node was full after all: keep the place
                self.limiter.refund(client)
            else:
                await self._drop(ticket)
                link = tokens.issue(self.key, record.id, LINK_TTL, time.time())
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

    def _limited(self, form: bool, message: str) -> web.Response:
        return self._answer(form, 429, {"state": "limited", "retry_after": 20,
                                        "message": message})

    async def _drop(self, ticket: str) -> None:
        self.tickets.pop(ticket, None)
        self.holders.pop(ticket, None)
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
        ticket = html.escape(str(body.get("ticket", "")), quote=True)
        message = html.escape(str(body.get("message", "")))
        page = (f"<!doctype html><meta charset=utf-8><title>shoal: waiting</title>"
                f"<p>{message}</p><form method=post action=/terminal>"
                f'<input type=hidden name=ticket value="{ticket}">'
                f"<button>Try again</button></form>")
        return web.Response(text=page, status=status, content_type="text/html",
                            headers={**headers, **PAGE})


# ---------------------------------------------------------------------- pages

TERMINALS: web.AppKey[TerminalPool] = web.AppKey("shoal.terminals", TerminalPool)


def page(name: str) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / name, headers=PAGE)


async def pool_page(request: web.Request) -> web.StreamResponse:
    return page("pool.html")


async def pool_enter(request: web.Request) -> web.StreamResponse:
    pool = request.app[TERMINALS]
    try:
        return await pool.enter(request)
    except NoCapacityError as e:
        return error_json(503, e.message)


async def terminal_page(request: web.Request) -> web.StreamResponse:
    return page("terminal.html")


async def dashboard_page(request: web.Request) -> web.StreamResponse:
    return page("dashboard.html")


async def terminal_info(request: web.Request) -> web.Response:
    pool = request.app[TERMINALS]
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
