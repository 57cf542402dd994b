"""What a connected controller is made of: ``Parts.open`` connects to NATS, binds the
buckets, then builds every service with only its collaborators (its buckets and the services
it calls), in the order they need each other. Nothing in it is ever "not set yet"."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..config import ControllerConfig
from ..natsio import bus, replicas
from ..natsio.sessionstore import SessionCache, SessionStore
from ..natsio.types import NatsClient
from .apitokens import TokenStore
from .audit import AuditLog
from .logins import LoginStore
from .registry import NodeRegistry
from .services import ServiceManager
from .sessions import SessionService
from .terminals import TerminalPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """What a connected controller is made of, each part given only its collaborators."""

    nc: NatsClient
    buckets: bus.Buckets
    replicas: int  # copies of each bucket and stream
    replica_advice: str | None  # set when existing assets have fewer than wanted
    registry: NodeRegistry
    session_cache: SessionCache
    sessions: SessionService
    services: ServiceManager
    terminals: TerminalPool

    @classmethod
    async def open(cls, cfg: ControllerConfig, instance: str, logins: LoginStore,
                   api_tokens: TokenStore, audit: AuditLog,
                   services_url: Callable[[], str]) -> Parts:
        nc = await bus.connect(cfg.nats, "shoal-controller")
        started: list[Callable[[], Awaitable[None]]] = []  # undone if a later step fails
        try:
            return await cls._build(nc, cfg, instance, logins, api_tokens, audit, services_url,
                                    started)
        except BaseException:
            for stop in reversed(started):
                await stop()
            await bus.close(nc)
            raise

    @classmethod
    async def _build(cls, nc: NatsClient, cfg: ControllerConfig, instance: str,
                     logins: LoginStore, api_tokens: TokenStore, audit: AuditLog,
                     services_url: Callable[[], str],
                     started: list[Callable[[], Awaitable[None]]]) -> Parts:
        size = replicas.cluster_size(nc)
        copies = replicas.wanted(cfg.replicas, size)
        buckets = await bus.ensure_buckets(nc, cfg.node_ttl, copies, cfg.terminal_output_bytes)
        js = buckets.js
        await logins.start(js, copies)
        await api_tokens.start(js, copies)
        started.append(api_tokens.stop)
        await audit.start(js, copies, cfg.audit_retention)
        registry = NodeRegistry(buckets.heartbeats, buckets.registry, cfg.node_ttl)
        await registry.start()
        started.append(registry.stop)
        cache = SessionCache(buckets.sessions)
        await cache.start()
        started.append(cache.stop)
        sessions = SessionService(nc, js, SessionStore(buckets.sessions), cache, registry,
                                  cfg.retention, cfg.token)
        sessions.start()
        started.append(sessions.stop)
        assert buckets.services is not None  # ensure_buckets binds it
        services = ServiceManager(buckets.services, sessions, registry, instance,
                                  services_url)
        await services.start()
        started.append(services.stop)
        terminals = await TerminalPool.open(cfg, js, copies, registry, sessions)
        started.append(terminals.stop)
        # Buckets made before the cluster grew (or with replicas = 1) keep their count.
        advice = replicas.advice(await replicas.assets(nc), copies, size)
        if advice:
            log.warning("%s", advice)
        return cls(nc=nc, buckets=buckets, replicas=copies, replica_advice=advice,
                   registry=registry, session_cache=cache, sessions=sessions,
                   services=services, terminals=terminals)

    async def stop(self) -> None:
        await self.terminals.stop()
        await self.services.stop()
        await self.sessions.stop()
        await self.session_cache.stop()
        await self.registry.stop()
