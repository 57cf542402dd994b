"""The controller: HTTP API and web UI in front of NATS. It keeps no state of its own: nodes
(and later sessions) live in JetStream, so any number of controllers can run at once."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from typing import TYPE_CHECKING

from aiohttp import web

from .. import bus
from ..config import ControllerConfig
from ..errors import ConfigError
from ..nodegroups import GroupsError, GroupsFile
from ..sessionstore import SessionCache, SessionStore
from ..web import static_dir
from .api import add_routes, json_http_errors
from .auth import auth_middleware
from .metrics import add_metrics_route
from .nats_api import NatsApi
from .openapi import openapi_handler
from .registry import NodeRegistry
from .run_ws import handle_run
from .services import ServiceManager
from .services_api import add_service_routes
from .sessions import SessionService
from .terminals import TerminalPool, add_terminal_routes

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, cfg: ControllerConfig) -> None:
        if not cfg.token:
            raise ConfigError("the controller needs an API token: set token in controller.toml "
                              "or SHOAL_TOKEN (shoal up generates one)")
        self.cfg = cfg
        self.nc: bus.NatsClient = None  # type: ignore[assignment]
        self.buckets: bus.Buckets | None = None
        self.registry: NodeRegistry = None  # type: ignore[assignment]
        self.runner: web.AppRunner | None = None
        self.port = cfg.port
        self.instance = secrets.token_hex(4)  # tells controllers apart in replies and logs
        self.js: JetStreamContext = None  # type: ignore[assignment]
        self.session_cache: SessionCache | None = None
        self.sessions: SessionService = None  # type: ignore[assignment]
        self.nats_api: NatsApi | None = None
        self.services: ServiceManager = None  # type: ignore[assignment]
        self.terminals: TerminalPool | None = None
        self.groups = GroupsFile(cfg.groups)  # @group in node sets (shoal.nodegroups)
        try:
            self.groups.get()  # a broken groups file stops the start, clearly
        except GroupsError as e:
            raise ConfigError(f"groups = {cfg.groups!r}: {e}") from e
        try:
            static_dir()  # fail at start, clearly, if the web files were not built
        except RuntimeError as e:
            raise ConfigError(str(e)) from e

    async def start(self) -> None:
        self.nc = await bus.connect(self.cfg.nats, "shoal-controller")
        self.buckets = await bus.ensure_buckets(self.nc, self.cfg.node_ttl, self.cfg.replicas)
        self.js = self.buckets.js
        self.registry = NodeRegistry(self.buckets.heartbeats, self.buckets.registry,
                                     self.cfg.node_ttl)
        await self.registry.start()
        self.session_cache = SessionCache(self.buckets.sessions)
        await self.session_cache.start()
        self.sessions = SessionService(self.nc, self.js, SessionStore(self.buckets.sessions),
                                       self.session_cache, self.registry, self.cfg.retention,
                                       self.cfg.token)
        self.sessions.start()
        assert self.buckets.services is not None
        self.services = ServiceManager(self, self.buckets.services)
        await self.services.start()
        self.nats_api = NatsApi(self)
        await self.nats_api.start()
        self.terminals = TerminalPool(self)
        await self.terminals.start()
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise ConfigError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {e.strerror};"
                              " choose another --port") from e
        addresses = self.runner.addresses  # learn the port when 0 was asked for
        if addresses:
            self.port = addresses[0][1]
        log.info("controller listening on %s", self.url)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.nats_api is not None:
            await self.nats_api.stop()
        if self.terminals is not None:
            await self.terminals.stop()
        if self.services is not None:
            await self.services.stop()
        if self.sessions is not None:
            await self.sessions.stop()
        if self.session_cache is not None:
            await self.session_cache.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.nc is not None:
            await bus.close(self.nc)

    def app(self) -> web.Application:
        async def consume_link(nonce: str) -> bool:
            return self.terminals is not None and await self.terminals.consume_link(nonce)

        app = web.Application(middlewares=[json_http_errors, auth_middleware(
            self.cfg.token, self.cfg.public_terminals, self.cfg.terminal_lifetime,
            consume_link, self.cfg.trusted_proxies)],
            client_max_size=1 << 20)
        app["controller"] = self
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/api/v1/run", handle_run)
        app.router.add_get("/api/v1/openapi.json", openapi_handler)
        add_routes(app)
        add_service_routes(app)
        add_terminal_routes(app)
        add_metrics_route(app)
        return app


async def _healthz(request: web.Request) -> web.Response:
    """For load balancers: 200 while this controller can reach NATS, 503 when it cannot."""
    nc = request.app["controller"].nc
    if nc is None or not nc.is_connected:
        return web.Response(text="nats disconnected\n", status=503)
    return web.Response(text="ok\n")


async def run_controller(cfg: ControllerConfig) -> None:
    ctl = Controller(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await ctl.start()
    print(f"shoal controller on {ctl.url}", flush=True)
    await stop.wait()
    await ctl.stop()
