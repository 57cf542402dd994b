"""``GET /metrics``: Prometheus metrics, computed from the controller's caches at scrape time.

Nothing is counted in the controller (it keeps no state): every value is read from the node,
session and service views when Prometheus asks, so any controller gives the same answer.
Scrape it with the API token (``authorization: {credentials: TOKEN}`` in Prometheus).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..logic.sessionstate import TRANSITIONS
from ..wire.messages import SessionState

if TYPE_CHECKING:
    from ..natsio.sessionstore import SessionCache
    from .registry import NodeRegistry
    from .services import ServiceManager


class FleetCollector(Collector):
    def __init__(self, registry: NodeRegistry, sessions: SessionCache,
                 services: ServiceManager) -> None:
        self.registry = registry
        self.sessions = sessions
        self.services = services

    def collect(self) -> Iterator[Metric]:
        nodes = self.registry.snapshot().values()
        by_state = GaugeMetricFamily("shoal_nodes", "Nodes by state.", labels=["state"])
        counts = Counter(n.state for n in nodes)
        for state in ("ready", "draining", "down"):
            by_state.add_metric([state], counts[state])
        yield by_state
        capacity = GaugeMetricFamily("shoal_node_capacity", "Sessions a node takes.",
                                     labels=["node"])
        used = GaugeMetricFamily("shoal_node_sessions", "Live sessions on a node.",
                                 labels=["node"])
        cpu = GaugeMetricFamily("shoal_node_cpu_percent", "CPU use of a node.", labels=["node"])
        mem = GaugeMetricFamily("shoal_node_memory_percent", "Memory use of a node.",
                                labels=["node"])
        for n in nodes:
            if n.state == "down":
                continue
            capacity.add_metric([n.name], n.capacity)
            used.add_metric([n.name], n.sessions)
            cpu.add_metric([n.name], n.load.cpu_percent)
            mem.add_metric([n.name], n.load.mem_percent)
        yield from (capacity, used, cpu, mem)
        sessions = GaugeMetricFamily("shoal_sessions", "Session records by state.",
                                     labels=["state"])
        records = self.sessions.records.values()
        scount = Counter(r.state for r in records)
        states: list[SessionState] = list(TRANSITIONS)
        for state in states:
            sessions.add_metric([state], scount[state])
        yield sessions
        replicas = GaugeMetricFamily("shoal_service_replicas",
                                     "Replicas of a service by health.",
                                     labels=["service", "health"])
        for view in self.services.views():
            health = Counter(r.health for r in view.replicas)
            for h in ("up", "down", "init"):
                replicas.add_metric([view.name, h], health[h])
        yield replicas


FLEET: web.AppKey[FleetCollector] = web.AppKey("shoal.fleet_metrics", FleetCollector)


async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(request.app[FLEET])
    return web.Response(body=generate_latest(registry),
                        content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def add_metrics_route(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
