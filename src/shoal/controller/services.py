"""Services: named sets of replica sessions, kept at their count, probed, and balanced.

A service record lives in the ``shoal-services`` bucket; its replicas are ordinary sessions
with ``service=NAME``, one port each and ``restart="always"`` (so a crash restarts in
place; a replica that ends for good is replaced by the reconciler).

Every controller keeps its own view for choosing: it watches the buckets, probes every
replica itself and balances over what it saw (like several HAProxy instances in front of
the same servers). One controller at a time, the holder of a lease in the bucket, changes
things: it creates and ends replica sessions, so two controllers never both start the
missing replica.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import nats.js.errors

from ..errors import ConflictError, NoReplicaError, NotFoundError, ShoalError, ValidationError
from ..logic import balance, placement
from ..logic.sessionstate import FINAL, LIVE
from ..natsio.bus import mirror, watch_bucket
from ..wire import messages as m
from ..wire import servicetypes as st
from .probes import Prober, ProbeResult, ProbeSpec
from .sessions import validate as validate_session

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from .server import Controller

log = logging.getLogger(__name__)

SYNC_EVERY = 0.5  # seconds between view refreshes when nothing changed
RECONCILE_EVERY = 0.5
LEASE = 5.0  # seconds a leader's lease lasts without renewal
LEADER_KEY = "_leader"
MIN_DRAIN = 0.3  # a drained replica lives at least this long (clients already redirected)
MAX_BACKOFF = 30.0

_decode = msgspec.json.Decoder(st.ServiceRecord).decode
_encode = msgspec.json.Encoder().encode


class _Lease(msgspec.Struct):
    holder: str
    until: float


class ServiceManager:
    def __init__(self, ctl: Controller, kv: KeyValue) -> None:
        self.ctl = ctl
        self.kv = kv
        self.records: dict[str, st.ServiceRecord] = {}
        self.pools: dict[str, balance.Pool] = {}
        self.prober = Prober(self._on_probe)
        self.leader = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._drain_seen: dict[str, float] = {}  # sid -> when this controller saw it draining
        self._backoff: dict[str, tuple[float, float]] = {}  # service -> (delay, next create)
        self._failed_seen: set[str] = set()
        self._forged_seen: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(t()) for t in
                       (self._sync_loop, self._lease_loop, self._reconcile_loop)]
        self._tasks.append(asyncio.create_task(
            watch_bucket(self.kv, self._apply, self._ready.set, "services")))
        try:
            await asyncio.wait_for(self._ready.wait(), 10)
        except TimeoutError:
            log.warning("services bucket slow to load; continuing")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.prober.stop()
        if self.leader:  # hand over at once instead of after the lease runs out
            try:
                entry = await self.kv.get(LEADER_KEY)
                if entry.value and msgspec.json.decode(entry.value, type=_Lease).holder \
                        == self.ctl.instance:
                    await self.kv.delete(LEADER_KEY, last=entry.revision)
            except Exception:
                pass

    def _apply(self, key: str, value: bytes | None) -> None:
        if key.startswith("_"):
            return  # the leader lease
        if mirror(self.records, _decode, key, value):
            self._changed.set()

    # ------------------------------------------------------------------ records

    async def _get(self, name: str) -> tuple[st.ServiceRecord, int] | None:
        try:
            entry = await self.kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return _decode(entry.value), entry.revision

    async def get(self, name: str) -> st.ServiceRecord:
        st.check_name(name)
        found = await self._get(name)
        if found is None:
            raise NotFoundError(f"no service {name!r}; `shoal service list` shows them")
        return found[0]

    async def _update(self, name: str,
                      change: Callable[[st.ServiceRecord], st.ServiceRecord | None],
                      ) -> st.ServiceRecord:
        for _ in range(100):
            found = await self._get(name)
            if found is None:
                raise NotFoundError(f"no service {name!r}; `shoal service list` shows them")
            new = change(found[0])
            if new is None:
                return found[0]
            try:
                await self.kv.update(name, _encode(new), last=found[1])
                self.records[name] = new
                self._changed.set()
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise ConflictError(f"service {name}: too many concurrent changes; try again")

    async def create(self, spec: st.ServiceSpec) -> tuple[st.ServiceRecord, bool]:
        """Create a service; the same spec again is a no-op, a different one a conflict."""
        st.validate(spec)
        validate_session(st.replica_spec(spec, f"{spec.name}-0"))  # what every replica runs
        record = st.ServiceRecord(name=spec.name, spec=spec, created=time.time())
        try:
            await self.kv.create(spec.name, _encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            found = await self._get(spec.name)
            if found is None:
                raise ConflictError(f"service {spec.name} is being removed; try again") from None
            if found[0].spec != spec:
                raise ConflictError(f"service {spec.name} exists with another spec; use "
                                    "`shoal service scale` or remove it first") from None
            return found[0], False
        self.records[spec.name] = record
        self._changed.set()
        return record, True

    async def scale(self, name: str, replicas: int) -> st.ServiceRecord:
        if not 0 <= replicas <= 1000:
            raise ValidationError(f"replicas must be between 0 and 1000, not {replicas}")
        return await self._update(name, lambda r: msgspec.structs.replace(
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

        record = await self._update(name, change)
        self._mark_draining(name)
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
                await self.ctl.sessions.remove(r.id)
            except ShoalError as e:
                log.warning("removing replica %s of %s: %s", r.id, name, e)
        try:
            await self.kv.purge(name)
        except nats.js.errors.KeyNotFoundError:
            pass
        self.records.pop(name, None)
        self._changed.set()

    # ------------------------------------------------------------------ views

    def replica_sessions(self, name: str) -> list[m.SessionRecord]:
        """The replicas of ``name``: sealed records only (one forged with the agent
        credential, naming any address, is never counted, probed or sent traffic)."""
        sessions = self.ctl.sessions
        return [r for r in sessions.cache.records.values()
                if r.spec.service == name and self._trusted(r)]

    def _trusted(self, record: m.SessionRecord) -> bool:
        if self.ctl.sessions.sealed(record):
            return True
        if record.id not in self._forged_seen and len(self._forged_seen) < 10_000:
            self._forged_seen.add(record.id)
            log.warning("session %s claims to be a replica of %s but has no valid seal; "
                        "ignoring it", record.id, record.spec.service)
        return False

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
                              url=f"{self.ctl.services_url}/s/{record.name}/")

    def views(self) -> list[st.ServiceView]:
        return [self.view(r) for _, r in sorted(self.records.items())]

    # ------------------------------------------------------------------ choice

    def choose(self, name: str, exclude: frozenset[str] | set[str] = frozenset(),
               ) -> tuple[st.ServiceRecord, balance.Replica]:
        st.check_name(name)
        record = self.records.get(name)
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

    def best(self, name: str) -> st.Best:
        _, r = self.choose(name)
        r.assign(time.monotonic())
        return st.Best(host=r.host, port=r.port, url=f"http://{_hostport(r.host, r.port)}/",
                       replica=r.key)

    # ------------------------------------------------------------------ view upkeep

    def _host(self, s: m.SessionRecord) -> str:
        if s.address:
            return s.address
        node = self.ctl.registry.node(s.node)
        return (node.address if node and node.address else s.node) or "127.0.0.1"

    async def _sync_loop(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:
                log.exception("services sync failed")
            self._changed.clear()
            cache = self.ctl.sessions.cache
            cache.changed.clear()
            waits = [asyncio.ensure_future(self._changed.wait()),
                     asyncio.ensure_future(cache.changed.wait())]
            await asyncio.wait(waits, timeout=SYNC_EVERY, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            await asyncio.sleep(0.02)  # coalesce bursts of changes

    def sync(self) -> None:
        """Bring pools and probes in line with the records and the replica sessions."""
        nodes = self.ctl.registry.snapshot()
        wanted: set[str] = set()
        by_service: dict[str, list[m.SessionRecord]] = {}
        for s in self.ctl.sessions.cache.records.values():
            if s.spec.service and s.spec.service in self.records and self._trusted(s):
                by_service.setdefault(s.spec.service, []).append(s)
        for name in list(self.pools):
            if name not in self.records:
                del self.pools[name]
        for name, record in self.records.items():
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
                node = nodes.get(s.node)
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

    def _mark_draining(self, name: str) -> None:
        try:
            self.sync()
        except Exception:
            log.exception("services sync failed")

    def _on_probe(self, key: str, spec: ProbeSpec, result: ProbeResult) -> None:
        for name, pool in self.pools.items():
            rep = pool.replicas.get(key)
            if rep is None or (rep.host, rep.port) != (spec.host, spec.port):
                continue
            if rep.check(result.ok, time.monotonic(), result.latency, result.error):
                log.info("service %s: replica %s (%s:%d) is %s%s", name, key, rep.host,
                         rep.port, rep.health, f": {result.error}" if result.error else "")

    def replica(self, name: str, key: str) -> balance.Replica | None:
        pool = self.pools.get(name)
        return pool.replicas.get(key) if pool else None

    # ------------------------------------------------------------------ leadership

    async def _lease_loop(self) -> None:
        while True:
            try:
                self.leader = await self._renew()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.leader = False
                log.warning("services lease: %s", e)
            await asyncio.sleep(LEASE / 4)

    async def _renew(self) -> bool:
        me = self.ctl.instance
        now = time.time()
        mine = _encode(_Lease(holder=me, until=now + LEASE))
        try:
            entry = await self.kv.get(LEADER_KEY)
        except nats.js.errors.KeyNotFoundError:
            entry = None
        try:
            if entry is None or entry.value is None or not entry.value:
                await self.kv.create(LEADER_KEY, mine)
                return True
            lease = msgspec.json.decode(entry.value, type=_Lease)
            if lease.holder == me or lease.until < now:
                await self.kv.update(LEADER_KEY, mine, last=entry.revision)
                return True
        except (nats.js.errors.KeyWrongLastSequenceError, msgspec.DecodeError):
            return False
        return False

    # ------------------------------------------------------------------ reconciler

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_EVERY)
            if not self.leader:
                continue
            for name in list(self.records):
                try:
                    await self.reconcile(name)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("service %s: reconcile failed: %s", name, e)

    async def reconcile(self, name: str) -> None:
        record = self.records.get(name)
        if record is None:
            return
        now_wall, now = time.time(), time.monotonic()
        nodes = self.ctl.registry.snapshot()
        sessions = self.replica_sessions(name)
        live = [s for s in sessions if s.state in LIVE]
        pool = self.pools.get(name, balance.Pool())

        # Crash backoff: replicas that ended for good slow down the next creations.
        for s in sessions:
            if s.state == "failed" and s.id not in self._failed_seen:
                self._failed_seen.add(s.id)
                delay = min(MAX_BACKOFF, max(0.5, self._backoff.get(name, (0.0, 0.0))[0] * 2))
                self._backoff[name] = (delay, now + delay)
        if any(r.health == "up" and now - r.changed_at > 10 for r in pool.replicas.values()):
            self._backoff.pop(name, None)

        # Draining replicas: end them when idle here (or at their deadline).
        draining: set[str] = set()
        for s in live:
            node = nodes.get(s.node)
            deadline = record.draining.get(s.id)
            if record.stopped and deadline is None:
                deadline = now_wall
            if deadline is None and s.node and node is not None and node.state == "draining":
                deadline = self._drain_seen.get("node:" + s.id) or \
                    now_wall + record.spec.drain_deadline
                self._drain_seen["node:" + s.id] = deadline
            if deadline is None:
                continue
            draining.add(s.id)
            seen = self._drain_seen.setdefault(s.id, now)
            rep = pool.replicas.get(s.id)
            idle = rep is None or rep.inflight == 0
            if (idle and now - seen >= MIN_DRAIN) or now_wall >= deadline:
                why = "drained" if idle else "drain deadline reached"
                await self.ctl.sessions.kill(s.id, f"service {name}: {why}")
        # Forget drain marks of replicas that have ended.
        gone = set(record.draining) - {s.id for s in live}
        if gone:
            await self._update(name, lambda r: msgspec.structs.replace(
                r, draining={k: v for k, v in r.draining.items() if k not in gone}))
        for key in [k for k in self._drain_seen if k.removeprefix("node:") not in
                    {s.id for s in live}]:
            del self._drain_seen[key]

        # Count: start the missing replicas, drain the extra ones.
        active = [s for s in live if s.id not in draining]
        target = 0 if record.stopped else record.spec.replicas
        if len(active) > target:
            def rank(s: m.SessionRecord) -> tuple[int, float]:
                rep = pool.replicas.get(s.id)
                healthy = rep is not None and rep.health == "up"
                return (1 if healthy else 0, -(rep.cost(now) if rep else 0.0))
            extra = sorted(active, key=rank)[:len(active) - target]
            until = now_wall + record.spec.drain_deadline
            await self._update(name, lambda r: msgspec.structs.replace(
                r, draining={**r.draining, **{s.id: until for s in extra}}))
        elif len(active) < target:
            delay, next_at = self._backoff.get(name, (0.0, 0.0))
            if now < next_at:
                return
            for _ in range(target - len(active)):
                await self._start_replica(record, live)

    async def _start_replica(self, record: st.ServiceRecord,
                             live: list[m.SessionRecord]) -> None:
        spec = record.spec
        per_node: dict[str, int] = {}
        for s in live:
            if s.node:
                per_node[s.node] = per_node.get(s.node, 0) + 1
        session = st.replica_spec(spec, f"{spec.name}-{secrets.token_hex(4)}")
        nodes = self.ctl.registry.snapshot()
        pool = placement.eligible(session, nodes)
        if pool:  # spread: the node with the fewest replicas of this service first
            best = min(pool, key=lambda n: (per_node.get(n.name, 0), placement.score(n)))
            session = msgspec.structs.replace(session, node=best.name)
        created, _ = await self.ctl.sessions.create(session)
        if created.node:
            per_node[created.node] = per_node.get(created.node, 0) + 1
        live.append(created)
        if created.state == "failed":
            log.warning("service %s: replica %s failed to start: %s", spec.name, created.id,
                        created.reason)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
