"""The controller: HTTP API and web UI in front of NATS. It keeps no state of its own: nodes
(and later sessions) live in JetStream, so any number of controllers can run at once."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import ssl
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import ControllerConfig
from ..errors import ConfigError
from ..logic.nodegroups import GroupsError, GroupsFile
from ..natsio import bus, replicas
from ..natsio.sessionstore import SessionCache, SessionStore
from ..web import static_dir
from .api import add_routes, json_http_errors
from .apitokens import TokenStore
from .audit import AuditLog
from .auth import auth_middleware
from .enroll import Enrollment
from .enroll import add_routes as add_enroll_routes
from .headers import install as install_security_headers
from .hosts import host_middleware
from .logins import LoginStore, add_login_routes
from .metrics import add_metrics_route
from .nats_api import NatsApi
from .openapi import openapi_handler
from .proxy import services_app
from .registry import NodeRegistry
from .reports import Reports
from .run_ws import handle_run
from .services import ServiceManager
from .services_api import add_service_routes
from .sessions import SessionService
from .terminals import TerminalPool, add_terminal_routes
from .tokens_api import add_token_routes

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
        self.services_runner: web.AppRunner | None = None
        self.port = cfg.port
        _check_services_settings(cfg)
        _check_output_settings(cfg)
        self.services_port = _services_port(cfg)
        self.ssl = server_tls(cfg)  # None: plain HTTP
        self.instance = secrets.token_hex(4)  # tells controllers apart in replies and logs
        self.js: JetStreamContext = None  # type: ignore[assignment]
        self.session_cache: SessionCache | None = None
        self.sessions: SessionService = None  # type: ignore[assignment]
        self.nats_api: NatsApi | None = None
        self.services: ServiceManager = None  # type: ignore[assignment]
        self.terminals: TerminalPool | None = None
        self.logins = LoginStore(cfg.token, cfg.login_lifetime)
        self.api_tokens = TokenStore(cfg.token)
        self.enrollment = Enrollment(self)  # node identities (only with cfg.identity)
        self.reports = Reports(self)  # what agents report on their own subjects
        self.audit = AuditLog(self.instance)
        self.replicas = 1  # copies of each bucket and stream (decided at start)
        self.replica_advice: str | None = None  # set when existing assets have fewer
        self.groups = GroupsFile(cfg.groups)  # @group in node sets (shoal.logic.nodegroups)
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
        size = replicas.cluster_size(self.nc)
        self.replicas = replicas.wanted(self.cfg.replicas, size)
        self.buckets = await bus.ensure_buckets(self.nc, self.cfg.node_ttl, self.replicas,
                                                self.cfg.terminal_output_bytes)
        self.js = self.buckets.js
        await self.logins.start(self.js, self.replicas)
        await self.api_tokens.start(self.js, self.replicas)
        await self.enrollment.start(self.nc, self.js, self.replicas)
        await self.reports.start()
        await self.audit.start(self.js, self.replicas, self.cfg.audit_retention)
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
        # Buckets made before the cluster grew (or with replicas = 1) keep their count.
        self.replica_advice = replicas.advice(await replicas.assets(self.nc), self.replicas,
                                              size)
        if self.replica_advice:
            log.warning("%s", self.replica_advice)
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, reuse_address=True,
                           ssl_context=self.ssl)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise ConfigError(f"cannot listen on {self.cfg.host}:{self.cfg.port}: {e.strerror};"
                              " choose another --port") from e
        addresses = self.runner.addresses  # learn the port when 0 was asked for
        if addresses:
            self.port = addresses[0][1]
        self.services_runner = web.AppRunner(services_app(self), access_log=None,
                                             handle_signals=False)
        await self.services_runner.setup()
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
        if self.runner is not None:
            await self.runner.cleanup()
        if self.services_runner is not None:
            await self.services_runner.cleanup()
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
        await self.api_tokens.stop()
        await self.enrollment.stop()
        await self.reports.stop()
        if self.nc is not None:
            await bus.close(self.nc)

    def app(self) -> web.Application:
        async def consume_link(nonce: str) -> bool:
            return self.terminals is not None and await self.terminals.consume_link(nonce)

        app = web.Application(middlewares=[
            host_middleware(self.cfg), json_http_errors,
            auth_middleware(self.cfg, self.logins, consume_link)], client_max_size=1 << 20)
        app["controller"] = self
        install_security_headers(app)
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/api/v1/run", handle_run)
        app.router.add_get("/api/v1/openapi.json", openapi_handler)
        add_routes(app)
        add_enroll_routes(app)
        add_service_routes(app)
        add_terminal_routes(app)
        add_login_routes(app)
        add_token_routes(app)
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
    nc = ctl.nc
    if nc is None or not nc.is_connected:
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
    await ctl.start()
    print(f"shoal controller on {ctl.url}", flush=True)
    print(f"services on {ctl.services_url}/s/NAME/", flush=True)
    await stop.wait()
    await ctl.stop()
