"""The services reconciler: one controller at a time (the holder of the services lease)
keeps every service at its count. Each pass gathers what it sees, asks
``shoal.logic.servicereconcile.plan`` what to do and does it: so two controllers never both
start the missing replica, and the decisions are tested without NATS."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import msgspec

from ..logic import balance
from ..logic import servicereconcile as plan
from ..natsio.lease import LEASE, Lease
from ..system.tasks import end_tasks
from ..wire import servicetypes as st
from .registry import NodeRegistry
from .servicepools import ServicePools
from .servicerecords import ServiceRecords
from .sessions import SessionService

log = logging.getLogger(__name__)

RECONCILE_EVERY = 0.5


class ServiceReconciler:
    def __init__(self, records: ServiceRecords, pools: ServicePools, sessions: SessionService,
                 registry: NodeRegistry, lease: Lease) -> None:
        self.records = records
        self.pools = pools
        self.sessions = sessions
        self.registry = registry
        self.lease = lease
        self.leader = False
        self.memory: dict[str, plan.Memory] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._lease_loop()),
                       asyncio.create_task(self._reconcile_loop())]

    async def stop(self) -> None:
        await end_tasks(self._tasks)
        if self.leader:  # hand over at once instead of after the lease runs out
            try:
                await self.lease.release()
            except Exception as e:  # NATS already away: the lease runs out by itself
                log.debug("releasing the services lease: %s", e)

    async def _lease_loop(self) -> None:
        while True:
            try:
                self.leader = await self.lease.renew()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.leader = False
                log.warning("services lease: %s", e)
            if not self.leader:
                self.memory.clear()  # a later leadership starts afresh
            await asyncio.sleep(LEASE / 4)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_EVERY)
            if not self.leader:
                continue
            for name in list(self.records.records):
                try:
                    await self.reconcile(name)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("service %s: reconcile failed: %s", name, e)
            for name in set(self.memory) - set(self.records.records):
                del self.memory[name]

    async def reconcile(self, name: str) -> None:
        record = self.records.records.get(name)
        if record is None:
            return
        actions, self.memory[name] = plan.plan(
            record, self.pools.replica_sessions(name), self.registry.snapshot(),
            self.pools.pools.get(name) or balance.Pool(), self.memory.get(name, plan.Memory()),
            now_wall=time.time(), now=time.monotonic())
        for action in actions:
            await self._apply(record, action)

    async def _apply(self, record: st.ServiceRecord, action: plan.Action) -> None:
        name = record.name
        match action:
            case plan.KillReplica(id=sid, reason=reason):
                await self.sessions.kill(sid, reason)
            case plan.ForgetDrains(ids=ids):
                gone = set(ids)
                await self.records.update(name, lambda r: msgspec.structs.replace(
                    r, draining={k: v for k, v in r.draining.items() if k not in gone}))
            case plan.MarkDraining(ids=ids, until=until):
                await self.records.update(name, lambda r: msgspec.structs.replace(
                    r, draining={**r.draining, **dict.fromkeys(ids, until)}))
            case plan.StartReplica(node=node):
                session = st.replica_spec(record.spec, f"{name}-{secrets.token_hex(4)}")
                if node is not None:
                    session = msgspec.structs.replace(session, node=node)
                created, _ = await self.sessions.create(session)
                if created.state == "failed":
                    log.warning("service %s: replica %s failed to start: %s", name,
                                created.id, created.reason)
