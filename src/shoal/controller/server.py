"""The controller: HTTP API and web UI in front of NATS. It keeps no state of its own: nodes
and sessions live in JetStream, so any number of controllers can run at once.

Built in two steps: ``Controller(cfg)`` checks the settings (and can build the web app, for
route listings); ``start()`` connects, then ``Parts.open`` builds every service with only
what it needs (its buckets and the services it calls), so nothing in a running controller
is ever "not set yet"; the API handlers reach them through the controller's attributes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from ..config import ControllerConfig
from ..errors import ConfigError
from ..logic.nodegroups import GroupsError, GroupsFile
from ..natsio import bus
from ..natsio.sessionstore import SessionCache
from ..natsio.types import JetStreamContext, NatsClient
from ..system import stacks
from ..web import static_dir
from .api import json_http_errors
from .apitokens import TokenStore
from .audit import AuditLog
from .auth import auth_middleware
from .enroll import Enrollment
from .headers import install as install_security_headers
from .hosts import host_middleware
from .logins import LOGINS, LoginStore, add_login_routes
from .metrics import FLEET, FleetCollector, add_metrics_route
from .nats_api import NatsApi
from .parts import Parts
from .proxy import SERVICES_BASE, services_app
from .registry import NodeRegistry
from .reports import Reports
from .routes import add_routes
from .services import ServiceManager
from .sessions import SessionService
from .terminals import TERMINALS, TerminalPool, add_terminal_routes

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024  # connections the kernel queues for accept (capped by somaxconn)
# At a stop, requests still in progress (a `logs -f`, an attached terminal, a run's stream:
# they never end by themselves while sessions go on) get this long before they are cut;
# aiohttp's default of 60 s held such a stop that long (one `logs -f` was enough).
HTTP_STOP_GRACE = 2.0


class NotStarted(RuntimeError):
    """A connected part of the controller was asked for before ``start()``."""


class Controller:
    def __init__(self, cfg: ControllerConfig) -> None:
        if not cfg.token:
            raise ConfigError("the controller needs an API token: set token in controller.toml "
                              "or SHOAL_TOKEN (shoal up generates one)")
        self.cfg = cfg
        self.port = cfg.port
        _check_services_settings(cfg)
        _check_output_settings(cfg)
        self.services_port = _services_port(cfg)
        self.ssl = server_tls(cfg)  # None: plain HTTP
        self.instance = secrets.token_hex(4)  # tells controllers apart in replies and logs
        self.logins = LoginStore(cfg.token, cfg.login_lifetime)
        self.api_tokens = TokenStore(cfg.token)
        self.enrollment = Enrollment(self)  # node identities (only with cfg.identity)
        self.reports = Reports(self)  # what agents report on their own subjects
        self.audit = AuditLog(self.instance)
        self.groups = GroupsFile(cfg.groups)  # @group in node sets (shoal.logic.nodegroups)
        try:
            self.groups.get()  # a broken groups file stops the start, clearly
        except GroupsError as e:
            raise ConfigError(f"groups = {cfg.groups!r}: {e}") from e
        try:
            static_dir()  # fail at start, clearly, if the web files were not built
        except RuntimeError as e:
            raise ConfigError(str(e)) from e
        self._parts: Parts | None = None  # set once, by start(): see the properties
        self._running: list[Callable[[], object]] = []  # what stop() undoes, last first

    # What the API handlers use, each a part of the running controller.

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise NotStarted("the controller is not started: call start() first")
        return self._parts

    @property
    def started(self) -> bool:
        return self._parts is not None

    @property
    def nc(self) -> NatsClient:
        return self.parts.nc

    @property
    def js(self) -> JetStreamContext:
        return self.parts.buckets.js

    @property
    def buckets(self) -> bus.Buckets:
        return self.parts.buckets

    @property
    def replicas(self) -> int:
        return self.parts.replicas

    @property
    def replica_advice(self) -> str | None:
        return self._parts.replica_advice if self._parts is not None else None

    @property
    def registry(self) -> NodeRegistry:
        return self.parts.registry

    @property
    def session_cache(self) -> SessionCache:
        return self.parts.session_cache

    @property
    def sessions(self) -> SessionService:
        return self.parts.sessions

    @property
    def services(self) -> ServiceManager:
        return self.parts.services

    @property
    def terminals(self) -> TerminalPool:
        return self.parts.terminals

    async def start(self) -> None:
        if self._parts is not None:
            raise RuntimeError("the controller is started already")
        self._parts = parts = await Parts.open(self.cfg, self.instance, self.logins,
                                                self.api_tokens, self.audit,
                                                lambda: self.services_url)
        self._running = [lambda: bus.close(parts.nc), self.api_tokens.stop, parts.stop]
        await self.enrollment.start(parts.nc, parts.buckets.js, parts.replicas)
        self._running.append(self.enrollment.stop)
        if self.enrollment.enabled:  # a chunk may list only its own credential's nodes
            parts.registry.require(self.enrollment.vouches)
        await self.reports.start()
        self._running.append(self.reports.stop)
        self.nats_api = NatsApi(self)
        await self.nats_api.start()
        self._running.append(self.nats_api.stop)
        app = self.app()
        app[TERMINALS] = parts.terminals
        app[FLEET] = FleetCollector(parts.registry, parts.session_cache, parts.services)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=HTTP_STOP_GRACE)
        await self.runner.setup()
        self._running.append(self.runner.cleanup)
        # A burst of new connections (hundreds of clients at once) waits in the kernel's
        # accept queue while the loop is busy; past aiohttp's default of 128 the kernel
        # drops SYNs, and each dropped client retries only a second later.
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, reuse_address=True,
                           ssl_context=self.ssl, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise ConfigError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {e.strerror};"
                              " choose another --port") from e
        addresses = self.runner.addresses  # learn the port when 0 was asked for
        if addresses:
            self.port = addresses[0][1]
        self.services_runner = web.AppRunner(services_app(self.cfg, parts.services),
                                             access_log=None, handle_signals=False,
                                             shutdown_timeout=HTTP_STOP_GRACE)
        await self.services_runner.setup()
        self._running.append(self.services_runner.cleanup)
        if self.services_port == -1:
            self.services_port = self.port + 1 if self.port < 65535 else 0
        site = web.TCPSite(self.services_runner, self.cfg.host, self.services_port,
                           reuse_address=True, ssl_context=self.ssl)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise ConfigError(f"cannot listen for services on {self.cfg.host}:"
                              f"{self.services_port}: {e.strerror}; choose another "
                              "--services-port") from e
        addresses = self.services_runner.addresses
        if addresses:
            self.services_port = addresses[0][1]
        log.info("controller listening on %s, services on %s", self.url, self.services_url)
        if not _loopback(self.cfg.host) and self.ssl is None and not self.cfg.trusted_proxies:
            log.warning("the controller listens on %s without TLS: tokens and terminal "
                        "keystrokes cross the network in clear. Set tls_cert and tls_key "
                        "(shoal up --tls makes them), or put a TLS terminator in front and "
                        "list it in trusted_proxies (docs/operations.md), or bind to "
                        "127.0.0.1", self.cfg.host or "every address")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.ssl is not None else "http"

    @property
    def services_url(self) -> str:
        """Where service NAME is reachable: this + ``/s/NAME/``."""
        if self.cfg.services_url:
            return self.cfg.services_url.rstrip("/")
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host
        return f"{self.scheme}://{host}:{self.services_port}"

    def services_base(self, request: web.Request) -> str:
        """The services origin as seen by the client of ``request`` (the same host name it
        used for the controller, on the services port), unless ``services_url`` says."""
        if self.cfg.services_url:
            return self.cfg.services_url.rstrip("/")
        host = request.url.raw_host or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{request.scheme}://{host}:{self.services_port}"

    async def stop(self) -> None:
        """Undo what ``start`` did, last first (listeners, then the NATS API, then the
        parts, then the connection); safe to call twice, or after a failed start."""
        running, self._running = self._running, []
        for undo in reversed(running):
            result = undo()
            if asyncio.iscoroutine(result):
                await result

    def app(self) -> web.Application:
        async def consume_link(nonce: str) -> bool:
            return self._parts is not None and await self._parts.terminals.consume_link(nonce)

        app = web.Application(middlewares=[
            host_middleware(self.cfg), json_http_errors,
            auth_middleware(self.cfg, self.logins, consume_link)], client_max_size=1 << 20)
        app["controller"] = self  # the API modules' handle (typed keys for the rest)
        app[LOGINS] = self.logins
        app[SERVICES_BASE] = self.services_base
        install_security_headers(app)
        app.router.add_get("/healthz", _healthz)
        add_routes(app)  # the operation table's (operations.py)
        add_terminal_routes(app)
        add_login_routes(app)
        add_metrics_route(app)
        return app


def server_tls(cfg: ControllerConfig) -> ssl.SSLContext | None:
    """HTTPS settings from ``tls_cert``/``tls_key`` (both or neither); None for plain HTTP."""
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError("tls_cert and tls_key go together: give both (the certificate, with "
                          "its chain, and its private key) or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load tls_cert {cfg.tls_cert} / tls_key {cfg.tls_key}: "
                          f"{e}; give PEM files of a certificate and its key") from e
    return ctx


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" (every address)


HEALTH_TIMEOUT = 2.0  # a NATS that takes longer than this to answer is not serving


def _services_port(cfg: ControllerConfig) -> int:
    """The services port to bind; -1 (the default) until the controller's port is known."""
    if cfg.services_port != -1:
        return cfg.services_port
    return 0 if cfg.port == 0 else -1


def _check_output_settings(cfg: ControllerConfig) -> None:
    if not 1 << 20 <= cfg.terminal_output_bytes <= 1 << 40:
        raise ConfigError(f"terminal_output_bytes {cfg.terminal_output_bytes}: give a size "
                          "between 1 MiB and 1 TiB (in bytes)")
    if not 1024 <= cfg.terminal_output_cap <= cfg.terminal_output_bytes:
        raise ConfigError(f"terminal_output_cap {cfg.terminal_output_cap}: give a size of at "
                          "least 1024 bytes and at most terminal_output_bytes")


def _check_services_settings(cfg: ControllerConfig) -> None:
    if not -1 <= cfg.services_port <= 65535:
        raise ConfigError(f"services_port {cfg.services_port}: give a port (0 for any free "
                          "one, -1 for the controller's port + 1)")
    if cfg.services_port > 0 and cfg.services_port == cfg.port:
        raise ConfigError(f"services_port {cfg.services_port} is the controller's port: service "
                          "traffic needs an origin of its own; choose another services_port")
    url = cfg.services_url
    if url and (not url.startswith(("http://", "https://")) or "?" in url or "#" in url
                or url.split("://", 1)[1].strip("/") == ""):
        raise ConfigError(f"services_url {url!r}: give a base URL such as "
                          "https://services.example.com (no query)")


async def _healthz(request: web.Request) -> web.Response:
    """For load balancers: 200 while this controller can reach NATS and JetStream answers,
    503 when it cannot (disconnected, or connected to a server that does not answer: a hung
    or overloaded NATS keeps the TCP connection up)."""
    ctl: Controller = request.app["controller"]
    if not ctl.started or not ctl.nc.is_connected:
        return web.Response(text="nats disconnected\n", status=503,
                            headers={"Retry-After": "2"})
    try:
        await asyncio.wait_for(ctl.js.account_info(), HEALTH_TIMEOUT)
    except bus.NATS_ERRORS as e:
        return web.Response(text=f"nats not answering: {str(e) or type(e).__name__}\n",
                            status=503, headers={"Retry-After": "2"})
    if not ctl.registry.settled():
        return web.Response(text="ok (catching up with the nodes after a NATS outage)\n")
    return web.Response(text="ok\n")


async def run_controller(cfg: ControllerConfig) -> None:
    ctl = Controller(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    stacks.dump_on_signal(loop)
    await ctl.start()
    print(f"shoal controller on {ctl.url}", flush=True)
    print(f"services on {ctl.services_url}/s/NAME/", flush=True)
    await stop.wait()
    await ctl.stop()
