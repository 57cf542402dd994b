"""This controller's own view of every service's replicas, for choosing: the balancer's
pools (shoal.logic.balance), kept in line with the records and the replica sessions, and
the probes that feed them. Every controller keeps one (like several HAProxy instances in
front of the same servers); none of it is shared."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import NoReplicaError as NoReplicaError  # re-exported (services.py)
from ..errors import NotFoundError
from ..logic import balance
from ..logic.sessionstate import FINAL, LIVE
from ..system.tasks import end_tasks
from ..wire import messages as m
from ..wire import servicetypes as st
from .probes import Prober, ProbeResult, ProbeSpec
from .servicerecords import ServiceRecords

if TYPE_CHECKING:
    from .registry import NodeRegistry
    from .sessions import SessionService

log = logging.getLogger(__name__)

SYNC_EVERY = 0.5  # seconds between view refreshes when nothing changed


class ServicePools:
    def __init__(self, records: ServiceRecords, sessions: SessionService,
                 registry: NodeRegistry, services_url: Callable[[], str]) -> None:
        self.records = records
        self.sessions = sessions
        self.registry = registry
        self.services_url = services_url  # known once the services listener is up
        self.pools: dict[str, balance.Pool] = {}
        self.prober = Prober(self._on_probe)
        self._forged_seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sync_loop())

    async def stop(self) -> None:
        await end_tasks([self._task])
        await self.prober.stop()

    # ------------------------------------------------------------------ replicas

    def replica_sessions(self, name: str) -> list[m.SessionRecord]:
        """The replicas of ``name``: sealed records only (one forged with the agent
        credential, naming any address, is never counted, probed or sent traffic)."""
        return [r for r in self.sessions.cache.of_services.values()
                if r.spec.service == name and self._trusted(r)]

    def _trusted(self, record: m.SessionRecord) -> bool:
        if self.sessions.sealed(record):
            return True
        if record.id not in self._forged_seen and len(self._forged_seen) < 10_000:
            self._forged_seen.add(record.id)
            log.warning("session %s claims to be a replica of %s but has no valid seal; "
                        "ignoring it", record.id, record.spec.service)
        return False

    def _host(self, s: m.SessionRecord) -> str:
        if s.address:
            return s.address
        node = self.registry.node(s.node)
        return (node.address if node and node.address else s.node) or "127.0.0.1"

    def replica(self, name: str, key: str) -> balance.Replica | None:
        pool = self.pools.get(name)
        return pool.replicas.get(key) if pool else None

    # ------------------------------------------------------------------ views

    def view(self, record: st.ServiceRecord) -> st.ServiceView:
        pool = self.pools.get(record.name, balance.Pool())
        out = []
        for s in sorted(self.replica_sessions(record.name), key=lambda r: r.created):
            if s.state in FINAL:
                continue
            rep = pool.replicas.get(s.id)
            out.append(st.ReplicaView(
                id=s.id, node=s.node, host=rep.host if rep else self._host(s),
                port=s.ports[0] if s.ports else 0, state=s.state,
                health=rep.health if rep else "init",
                draining=bool(rep.draining) if rep else s.id in record.draining,
                ewma_ms=round(rep.ewma * 1000, 3) if rep and rep.ewma is not None else None,
                inflight=rep.inflight if rep else 0, chosen=rep.chosen if rep else 0,
                last_error=rep.last_error if rep else ""))
        return st.ServiceView(name=record.name, spec=record.spec, created=record.created,
                              stopped=record.stopped, replicas=out,
                              up=sum(r.health == "up" and not r.draining for r in out),
                              url=f"{self.services_url()}/s/{record.name}/")

    # ------------------------------------------------------------------ choice

    def choose(self, name: str, exclude: frozenset[str] | set[str] = frozenset(),
               ) -> tuple[st.ServiceRecord, balance.Replica]:
        st.check_name(name)
        record = self.records.records.get(name)
        if record is None:
            raise NotFoundError(f"no service {name!r}; `shoal service list` shows them")
        if record.stopped:
            raise NoReplicaError(f"service {name} is drained: no replica takes new clients "
                                 f"(`shoal service scale {name} N` starts it again)")
        pool = self.pools.get(name)
        replica = pool.choose(time.monotonic(), exclude) if pool else None
        if replica is None:
            counts = pool.counts() if pool else {"up": 0, "down": 0, "init": 0, "draining": 0}
            total = len(pool.replicas) if pool else 0
            detail = (f"{total} replica(s): {counts['down']} failing checks, "
                      f"{counts['init']} not checked yet, {counts['draining']} draining")
            if exclude:
                detail += f", {len(exclude)} failed for this request"
            raise NoReplicaError(f"service {name} has no healthy replica right now ({detail});"
                                 f" `shoal service show {name}` says why")
        return record, replica

    # ------------------------------------------------------------------ upkeep

    async def _sync_loop(self) -> None:
        while True:
            self.sync_now()
            self.records.changed.clear()
            cache = self.sessions.cache
            cache.changed.clear()
            waits = [asyncio.ensure_future(self.records.changed.wait()),
                     asyncio.ensure_future(cache.changed.wait())]
            await asyncio.wait(waits, timeout=SYNC_EVERY, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            await asyncio.sleep(0.02)  # coalesce bursts of changes

    def sync_now(self) -> None:
        try:
            self.sync()
        except Exception:
            log.exception("services sync failed")

    def sync(self) -> None:
        """Bring pools and probes in line with the records and the replica sessions."""
        records = self.records.records
        wanted: set[str] = set()
        by_service: dict[str, list[m.SessionRecord]] = {}
        for s in self.sessions.cache.of_services.values():
            if s.spec.service in records and self._trusted(s):
                by_service.setdefault(s.spec.service, []).append(s)
        for name in list(self.pools):
            if name not in records:
                del self.pools[name]
        for name, record in records.items():
            pool = self.pools.setdefault(name, balance.Pool())
            kind, path = st.parse_check(record.spec.check)
            present: set[str] = set()
            for s in by_service.get(name, []):
                if s.state not in LIVE or not s.node or not s.ports:
                    continue
                host, port = self._host(s), s.ports[0]
                rep = pool.replicas.get(s.id)
                if rep is None or (rep.host, rep.port) != (host, port):
                    rep = balance.Replica(key=s.id, host=host, port=port,
                                          rise=record.spec.rise, fall=record.spec.fall)
                    pool.replicas[s.id] = rep
                rep.rise, rep.fall = record.spec.rise, record.spec.fall
                node = self.registry.node(s.node)  # a replica's, not the fleet's
                rep.draining = (record.stopped or s.id in record.draining
                                or node is None or node.state != "ready")
                present.add(s.id)
                self.prober.ensure(s.id, ProbeSpec(host=host, port=port, kind=kind, path=path,
                                                   interval=record.spec.interval,
                                                   timeout=record.spec.timeout))
            for sid in set(pool.replicas) - present:
                del pool.replicas[sid]
            wanted |= present
        for key in self.prober.keys() - wanted:
            self.prober.discard(key)

    def _on_probe(self, key: str, spec: ProbeSpec, result: ProbeResult) -> None:
        for name, pool in self.pools.items():
            rep = pool.replicas.get(key)
            if rep is None or (rep.host, rep.port) != (spec.host, spec.port):
                continue
            if rep.check(result.ok, time.monotonic(), result.latency, result.error):
                log.info("service %s: replica %s (%s:%d) is %s%s", name, key, rep.host,
                         rep.port, rep.health, f": {result.error}" if result.error else "")
