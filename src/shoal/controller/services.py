"""Services: named sets of replica sessions, kept at their count, probed, and balanced.

A service record lives in the ``shoal-services`` bucket; its replicas are ordinary sessions
with ``service=NAME``, one port each and ``restart="always"`` (so a crash restarts in
place; a replica that ends for good is replaced by the reconciler).

The jobs, one module each: ``servicerecords`` (the bucket), ``servicepools`` (this
controller's view for choosing: pools and probes), ``servicereconciler`` (the leader keeps
the counts; its decisions are ``shoal.logic.servicereconcile``). This module is what the
HTTP and NATS APIs call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from ..errors import NotFoundError, ShoalError, ValidationError
from ..logic import balance
from ..logic.sessionstate import LIVE
from ..natsio.lease import Lease
from ..natsio.types import KeyValue
from ..wire import messages as m
from ..wire import servicetypes as st
from .registry import NodeRegistry
from .servicepools import NoReplicaError, ServicePools
from .servicereconciler import ServiceReconciler
from .servicerecords import LEADER_KEY, ServiceRecords
from .sessions import SessionService
from .sessions import validate as validate_session

__all__ = ["NoReplicaError", "ServiceManager"]

log = logging.getLogger(__name__)


class ServiceManager:
    def __init__(self, bucket: KeyValue, sessions: SessionService, registry: NodeRegistry,
                 instance: str, services_url: Callable[[], str]) -> None:
        self.sessions = sessions
        self.store = ServiceRecords(bucket)
        self.balancer = ServicePools(self.store, sessions, registry, services_url)
        self.reconciler = ServiceReconciler(self.store, self.balancer, sessions, registry,
                                            Lease(bucket, LEADER_KEY, instance))

    @property
    def records(self) -> dict[str, st.ServiceRecord]:
        return self.store.records

    @property
    def leader(self) -> bool:
        return self.reconciler.leader

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.store.start()
        self.balancer.start()
        self.reconciler.start()

    async def stop(self) -> None:
        await self.reconciler.stop()
        await self.balancer.stop()
        await self.store.stop()

    # ------------------------------------------------------------------ operations

    async def get(self, name: str) -> st.ServiceRecord:
        return await self.store.get(name)

    async def create(self, spec: st.ServiceSpec) -> tuple[st.ServiceRecord, bool]:
        """Create a service; the same spec again is a no-op, a different one a conflict."""
        st.validate(spec)
        validate_session(st.replica_spec(spec, f"{spec.name}-0"))  # what every replica runs
        return await self.store.create(st.ServiceRecord(name=spec.name, spec=spec,
                                                        created=time.time()))

    async def scale(self, name: str, replicas: int) -> st.ServiceRecord:
        if not 0 <= replicas <= 1000:
            raise ValidationError(f"replicas must be between 0 and 1000, not {replicas}")
        return await self.store.update(name, lambda r: msgspec.structs.replace(
            r, spec=msgspec.structs.replace(r.spec, replicas=replicas), stopped=False))

    async def drain(self, name: str, replica: str | None, deadline: float | None,
                    wait: bool) -> st.ServiceRecord:
        """Stop new clients for one replica (it is replaced) or the whole service (it
        stops); in-flight requests finish; the replicas end when idle or at the deadline."""
        record = await self.get(name)
        grace = record.spec.drain_deadline if deadline is None else deadline
        until = time.time() + grace
        targets = [r.id for r in self.replica_sessions(name) if r.state in LIVE]
        if replica is not None:
            if replica not in targets:
                raise NotFoundError(f"service {name} has no live replica {replica!r}; "
                                    f"`shoal service show {name}` lists them")
            targets = [replica]

        def change(r: st.ServiceRecord) -> st.ServiceRecord:
            draining = dict(r.draining)
            for sid in targets:
                draining[sid] = min(draining.get(sid, until), until)
            return msgspec.structs.replace(r, draining=draining,
                                           stopped=r.stopped or replica is None)

        record = await self.store.update(name, change)
        self.balancer.sync_now()  # no new client for them from this controller from now on
        if wait:
            end = time.monotonic() + grace + 15
            while time.monotonic() < end:
                live = {r.id for r in self.replica_sessions(name) if r.state in LIVE}
                if not live & set(targets):
                    break
                await asyncio.sleep(0.1)
        return record

    async def remove(self, name: str, deadline: float | None = None) -> None:
        """Drain every replica (up to ``deadline``), end them, forget the service."""
        record = await self.drain(name, None, deadline, wait=False)
        grace = record.spec.drain_deadline if deadline is None else deadline
        end = time.monotonic() + grace
        while time.monotonic() < end:
            if not any(r.state in LIVE for r in self.replica_sessions(name)):
                break
            await asyncio.sleep(0.1)  # the leader ends them as they become idle
        for r in self.replica_sessions(name):
            try:
                await self.sessions.remove(r.id)
            except ShoalError as e:
                log.warning("removing replica %s of %s: %s", r.id, name, e)
        await self.store.remove(name)

    # ------------------------------------------------------------------ views and choice

    def replica_sessions(self, name: str) -> list[m.SessionRecord]:
        return self.balancer.replica_sessions(name)

    def view(self, record: st.ServiceRecord) -> st.ServiceView:
        return self.balancer.view(record)

    def views(self) -> list[st.ServiceView]:
        return [self.view(r) for _, r in sorted(self.records.items())]

    def choose(self, name: str, exclude: frozenset[str] | set[str] = frozenset(),
               ) -> tuple[st.ServiceRecord, balance.Replica]:
        return self.balancer.choose(name, exclude)

    def best(self, name: str) -> st.Best:
        _, r = self.choose(name)
        r.assign(time.monotonic())
        return st.Best(host=r.host, port=r.port, url=f"http://{_hostport(r.host, r.port)}/",
                       replica=r.key)

    def replica(self, name: str, key: str) -> balance.Replica | None:
        return self.balancer.replica(name, key)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
