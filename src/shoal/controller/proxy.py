"""``/s/NAME/...`` on the services listener: a service's public traffic, sent to its best
replica.

The services listener is an origin of its own (another port, or the host name in
``services_url``), never the controller's: a replica's pages run script, and on the
controller's origin that script could read ``/api/v1/*`` with the operator's login. On the
controller, ``/s/NAME/...`` only redirects there (``redirect_to_services``).

Without ``proxy`` in the service's spec the answer is a 307 redirect to the chosen replica
(the method and body are kept by the client). With it the controller forwards the request
itself, HTTP or WebSocket, over pooled keep-alive connections, and so sees each request's
latency and how many are in flight: both feed the balancer.

A request whose connection to a replica fails before any answer is tried on another
replica (up to ``MAX_ATTEMPTS``): always when the connection could not be opened (nothing
was sent), and for idempotent methods also when it broke after sending. When no replica is
up the answer is 503 with a JSON message at once, never a wait.

These paths need no shoal token (it is the service's traffic). What is forwarded, and how,
is in forwarding.py: the raw target byte for byte, no shoal credentials, no hop-by-hop
headers, ``X-Forwarded-For`` believed only from trusted proxies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..errors import ShoalError
from ..wire import servicetypes as st
from .auth import error_json
from .forwarding import WS_HANDSHAKE, answer_headers, split_target, upstream_headers
from .hosts import host_middleware

if TYPE_CHECKING:
    from ..config import ControllerConfig
    from ..logic import balance
    from .services import ServiceManager

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
BUFFER_LIMIT = 1 << 20  # answers up to this size (with a Content-Length) are sent in one go
CONNECT_TIMEOUT = 3.0
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
PROXY_KEY: web.AppKey[Proxy] = web.AppKey("shoal.proxy")
# The services origin as the client of a request sees it (Controller.services_base).
SERVICES_BASE: web.AppKey[Callable[[web.Request], str]] = web.AppKey("shoal.services_base")


class Proxy:
    def __init__(self, services: ServiceManager, trusted_proxies: list[str]) -> None:
        self.services = services
        self.trusted_proxies = trusted_proxies
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, family=socket.AF_INET,
                                               keepalive_timeout=30, ttl_dns_cache=10),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._http

    async def close(self, app: web.Application | None = None) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ entry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = split_target(request.raw_path)
        if target is None:
            return error_json(404, "this is the services listener: service NAME is at "
                                   "/s/NAME/ (`shoal service list` shows them)")
        name, path = target
        services = self.services
        try:
            st.check_name(name)
            record, replica = services.choose(name)
        except ShoalError as e:
            return error_json(e.status, e.message)
        if not record.spec.proxy:
            replica.assign(time.monotonic())
            return web.Response(status=307, headers={
                "Location": f"http://{_hostport(replica)}{path}",
                "Cache-Control": "no-store", "X-Shoal-Replica": replica.key})
        if (request.headers.get("Upgrade", "").lower() == "websocket"
                and request.method == "GET"):
            return await self._websocket(request, name, replica, path)
        return await self._http_request(request, name, replica, path)

    # ------------------------------------------------------------------ HTTP

    def _headers(self, request: web.Request, name: str, drop: frozenset[str] = frozenset(),
                 ) -> CIMultiDict[str]:
        return upstream_headers(request.headers, peer=request.remote or "",
                                trusted=self.trusted_proxies, host=request.host,
                                scheme=request.scheme, prefix=f"/s/{name}", drop=drop)

    async def _http_request(self, request: web.Request, name: str,
                            replica: balance.Replica, path: str) -> web.StreamResponse:
        body = await request.read() if request.body_exists else None
        headers = self._headers(request, name)
        method = request.method
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            tried.add(replica.key)
            start = time.monotonic()
            replica.begin(start)
            sent = False
            try:
                try:
                    resp = await self.http.request(
                        method, _url(replica, path), headers=headers,
                        data=body, allow_redirects=False)
                except aiohttp.ClientConnectorError as e:
                    self._failed(replica, f"connect: {e.os_error.strerror or e}")
                    errors.append(f"{replica.key}: cannot connect ({e.os_error.strerror or e})")
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        aiohttp.ClientPayloadError) as e:
                    sent = True
                    self._failed(replica, f"connection lost: {e}")
                    errors.append(f"{replica.key}: connection lost before an answer ({e})")
                else:
                    now = time.monotonic()
                    replica.sample(now - start, now)
                    return await self._answer(request, resp, replica)
            finally:
                replica.end(time.monotonic(), None)
            if len(tried) >= MAX_ATTEMPTS or (sent and method not in IDEMPOTENT):
                break
            try:
                _, replica = self.services.choose(name, tried)
            except ShoalError:
                break
        return error_json(502, f"service {name}: no replica answered ({'; '.join(errors)})"
                               + ("" if method in IDEMPOTENT else
                                  f"; {method} is not retried once sent"))

    def _failed(self, replica: balance.Replica, error: str) -> None:
        """A broken connection counts as a failed check (passive health)."""
        if replica.check(False, time.monotonic(), error=error):
            log.info("replica %s is %s: %s", replica.key, replica.health, error)

    async def _answer(self, request: web.Request, resp: aiohttp.ClientResponse,
                      replica: balance.Replica) -> web.StreamResponse:
        async with resp:
            headers = answer_headers(resp.headers)
            headers["X-Shoal-Replica"] = replica.key
            length = resp.content_length
            if length is not None and length <= BUFFER_LIMIT or request.method == "HEAD":
                data = await resp.read()
                out = web.Response(status=resp.status, reason=resp.reason, headers=headers,
                                   body=data if request.method != "HEAD" else None)
                if request.method == "HEAD" and length is not None:
                    out.headers["Content-Length"] = str(length)
                return out
            stream = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            if length is not None:
                stream.content_length = length
            await stream.prepare(request)
            async for chunk in resp.content.iter_any():
                await stream.write(chunk)
            await stream.write_eof()
            return stream

    # ------------------------------------------------------------------ WebSocket

    async def _websocket(self, request: web.Request, name: str, replica: balance.Replica,
                         path: str) -> web.StreamResponse:
        protocols = [p.strip() for p in
                     request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        headers = self._headers(request, name, drop=WS_HANDSHAKE)
        tried: set[str] = set()
        errors: list[str] = []
        upstream: aiohttp.ClientWebSocketResponse | None = None
        while upstream is None:
            tried.add(replica.key)
            start = time.monotonic()
            try:
                upstream = await self.http.ws_connect(
                    _url(replica, path), headers=headers,
                    protocols=protocols, autoping=False, max_msg_size=0)
                now = time.monotonic()
                replica.sample(now - start, now)
            except aiohttp.WSServerHandshakeError as e:
                return error_json(502, f"service {name}: replica {replica.key} refused the "
                                       f"WebSocket (HTTP {e.status})")
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientOSError) as e:
                self._failed(replica, f"connect: {e}")
                errors.append(f"{replica.key}: {e}")
                if len(tried) >= MAX_ATTEMPTS:
                    break
                try:
                    _, replica = self.services.choose(name, tried)
                except ShoalError:
                    break
        if upstream is None:
            return error_json(502, f"service {name}: no replica answered ({'; '.join(errors)})")
        ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   autoping=False, max_msg_size=0)
        replica.begin(time.monotonic())
        try:
            await ws.prepare(request)
            await _pump_both(ws, upstream)
        finally:
            replica.end(time.monotonic(), None)
            await upstream.close()
            await ws.close()
        return ws


async def _pump_both(ws: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                     ) -> None:
    async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.PING:
                await dst.ping(msg.data)
            elif msg.type == aiohttp.WSMsgType.PONG:
                await dst.pong(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                break
        code = src.close_code or 1000
        await dst.close(code=code if 1000 <= code < 5000 else 1000)

    tasks = [asyncio.create_task(pump(ws, upstream)), asyncio.create_task(pump(upstream, ws))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _hostport(replica: balance.Replica) -> str:
    host = replica.host
    return f"[{host}]:{replica.port}" if ":" in host else f"{host}:{replica.port}"


def _url(replica: balance.Replica, path: str) -> URL:
    # encoded=True: the raw target goes out exactly as it came in.
    return URL(f"http://{_hostport(replica)}{path}", encoded=True)


def services_app(cfg: ControllerConfig, services: ServiceManager) -> web.Application:
    """The services listener: only service traffic, no API, no shoal login; the Host check
    too, so that a DNS-rebinding page cannot reach services bound to loopback."""
    app = web.Application(client_max_size=1 << 20, middlewares=[host_middleware(cfg)])
    proxy = Proxy(services, cfg.trusted_proxies)
    app[PROXY_KEY] = proxy
    app.on_cleanup.append(proxy.close)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def redirect_to_services(request: web.Request) -> web.StreamResponse:
    """``/s/NAME/...`` on the controller's origin: 307 to the same raw target on the services
    origin (method and body kept); nothing of a service is ever served here."""
    return web.Response(status=307, headers={
        "Location": request.app[SERVICES_BASE](request) + request.raw_path,
        "Cache-Control": "no-store"})


def add_redirect_routes(app: web.Application) -> None:
    app.router.add_route("*", "/s/{name}", redirect_to_services)
    app.router.add_route("*", "/s/{name}/{tail:.*}", redirect_to_services)
