"""What the services reconciler decides for one service, as a pure function of what it sees.

``plan`` takes the service record, its replica sessions (sealed ones only), the nodes, the
balancer's pool (health, requests in flight, cost, from this controller's probes), what the
reconciler remembers from earlier passes (``Memory``) and both clocks; it returns the
actions and the memory for the next pass. The leader's loop in
``shoal.controller.servicereconciler`` gathers the inputs and applies the actions.

    crash backoff   a replica that ended ``failed`` doubles the pause before the next
                    creation (0.5 s up to MAX_BACKOFF); a replica up for 10 s clears it
    drain           a replica marked draining (by `service drain`, a scale down, its node
                    draining, or the service stopped) is killed once idle for MIN_DRAIN
                    here, or at its deadline, whichever comes first
    count           more active replicas than wanted: the least healthy, then the most
                    costly, are marked draining; fewer: the missing ones are started,
                    spread over the eligible nodes (fewest replicas of this service first)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from ..wire import messages as m
from ..wire import servicetypes as st
from . import placement
from .balance import Pool
from .sessionstate import LIVE

MIN_DRAIN = 0.3  # a drained replica lives at least this long (clients already redirected)
MAX_BACKOFF = 30.0
HEALTHY_FOR = 10.0  # seconds up after which a replica proves the crashes are over
NODE_DRAIN = "node:"  # memory key prefix: the deadline given to a replica on a draining node


class Memory(msgspec.Struct, frozen=True):
    """What one controller's reconciler keeps between passes for one service (lost with the
    leadership, which is fine: the next leader starts afresh, a little more patient)."""

    drain_seen: dict[str, float] = {}  # sid -> monotonic time first seen draining;
    #                                    "node:"+sid -> wall deadline given for a node drain
    backoff: tuple[float, float] = (0.0, 0.0)  # (delay, monotonic time of the next creation)
    failed_seen: frozenset[str] = frozenset()  # failed replicas already counted for backoff


class KillReplica(msgspec.Struct, frozen=True):
    id: str
    reason: str


class MarkDraining(msgspec.Struct, frozen=True):
    """Add these replicas to the record's ``draining``, to end by ``until`` (wall clock)."""

    ids: list[str]
    until: float


class ForgetDrains(msgspec.Struct, frozen=True):
    """Drop the drain marks of replicas that have ended from the record."""

    ids: list[str]


class StartReplica(msgspec.Struct, frozen=True):
    """Create one replica, pinned to ``node`` (None: no node is eligible now; the session
    service says why when it fails to place it)."""

    node: str | None


Action = KillReplica | MarkDraining | ForgetDrains | StartReplica


def plan(record: st.ServiceRecord, sessions: Sequence[m.SessionRecord],
         nodes: Mapping[str, m.NodeInfo], pool: Pool, memory: Memory, *, now_wall: float,
         now: float) -> tuple[list[Action], Memory]:
    """The actions for one pass over one service and the memory for the next one.
    ``now_wall``: wall clock (drain deadlines in the record); ``now``: monotonic (the
    pool's and the memory's times)."""
    name = record.name
    live = [s for s in sessions if s.state in LIVE]
    live_ids = {s.id for s in live}
    actions: list[Action] = []

    # Crash backoff: replicas that ended for good slow down the next creations.
    delay, next_at = memory.backoff
    failed = {s.id for s in sessions if s.state == "failed"}
    for _ in failed - memory.failed_seen:
        delay = min(MAX_BACKOFF, max(0.5, delay * 2))
        next_at = now + delay
    if any(r.health == "up" and now - r.changed_at > HEALTHY_FOR
           for r in pool.replicas.values()):
        delay, next_at = 0.0, 0.0

    # Draining replicas: end them when idle here (or at their deadline).
    drain_seen = dict(memory.drain_seen)
    draining: set[str] = set()
    for s in live:
        deadline = record.draining.get(s.id)
        if record.stopped and deadline is None:
            deadline = now_wall
        node = nodes.get(s.node) if s.node else None
        if deadline is None and node is not None and node.state == "draining":
            deadline = drain_seen.get(NODE_DRAIN + s.id) or now_wall + record.spec.drain_deadline
            drain_seen[NODE_DRAIN + s.id] = deadline
        if deadline is None:
            continue
        draining.add(s.id)
        seen = drain_seen.setdefault(s.id, now)
        rep = pool.replicas.get(s.id)
        idle = rep is None or rep.inflight == 0
        if (idle and now - seen >= MIN_DRAIN) or now_wall >= deadline:
            why = "drained" if idle else "drain deadline reached"
            actions.append(KillReplica(s.id, f"service {name}: {why}"))
    gone = sorted(set(record.draining) - live_ids)
    if gone:
        actions.append(ForgetDrains(gone))
    drain_seen = {k: v for k, v in drain_seen.items() if k.removeprefix(NODE_DRAIN) in live_ids}
    memory = Memory(drain_seen=drain_seen, backoff=(delay, next_at),
                    failed_seen=frozenset(failed))  # purged records are forgotten with them

    # Count: start the missing replicas, drain the extra ones.
    active = [s for s in live if s.id not in draining]
    target = 0 if record.stopped else record.spec.replicas
    if len(active) > target:
        def rank(s: m.SessionRecord) -> tuple[int, float]:
            rep = pool.replicas.get(s.id)
            healthy = rep is not None and rep.health == "up"
            return (1 if healthy else 0, -(rep.cost(now) if rep else 0.0))
        extra = sorted(active, key=rank)[:len(active) - target]
        actions.append(MarkDraining([s.id for s in extra],
                                    now_wall + record.spec.drain_deadline))
    elif len(active) < target and now >= next_at:
        actions += [StartReplica(n) for n in spread(record.spec, live, nodes,
                                                    target - len(active))]
    return actions, memory


def spread(spec: st.ServiceSpec, live: Sequence[m.SessionRecord],
           nodes: Mapping[str, m.NodeInfo], count: int) -> list[str | None]:
    """Nodes for ``count`` new replicas: each on the eligible node with the fewest
    replicas of this service so far (then the best placement score)."""
    per_node: dict[str, int] = {}
    for s in live:
        if s.node:
            per_node[s.node] = per_node.get(s.node, 0) + 1
    eligible = placement.eligible(st.replica_spec(spec, f"{spec.name}-new"), nodes)
    out: list[str | None] = []
    for _ in range(count):
        if not eligible:
            out.append(None)
            continue
        best = min(eligible, key=lambda n: (per_node.get(n.name, 0), placement.score(n)))
        per_node[best.name] = per_node.get(best.name, 0) + 1
        out.append(best.name)
    return out
