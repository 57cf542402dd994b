"""Placement: which node gets a new session (pure; the agent has the last word).

Filter the nodes (ready, matching the selector, with free capacity, able to run containers
for a container session), then choose by the
power of two random choices on a load score. ``spread`` prefers the less loaded of the two,
``binpack`` the fuller one (still with room). ``candidates`` returns an ordered list so a
refusal moves on to the next one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from ..wire.messages import NodeInfo, SessionSpec


def score(node: NodeInfo) -> float:
    """0 is idle, 1 is full: mostly session occupancy, with CPU and memory as tie-breakers."""
    occupancy = node.sessions / node.capacity if node.capacity else 1.0
    return 0.6 * occupancy + 0.25 * node.load.cpu_percent / 100 + 0.15 * node.load.mem_percent / 100


def eligible(spec: SessionSpec, nodes: Mapping[str, NodeInfo]) -> list[NodeInfo]:
    out = []
    for n in nodes.values():
        if n.state != "ready" or n.sessions >= n.capacity:
            continue
        if spec.node is not None and n.name != spec.node:
            continue
        if spec.runtime == "container" and not n.containers:
            continue
        if any(n.labels.get(k) != v for k, v in spec.selector.items()):
            continue
        out.append(n)
    return out


_RNG = random.Random()  # one, seeded once: seeding one per call cost a tenth of a placement


def candidates(spec: SessionSpec, nodes: Mapping[str, NodeInfo],
               rng: random.Random | None = None) -> list[str]:
    """Nodes to try, in order: repeated power-of-two choices over the eligible nodes."""
    rng = rng or _RNG
    pool = eligible(spec, nodes)
    order: list[str] = []
    binpack = spec.strategy == "binpack"
    while pool:
        if len(pool) == 1:
            pick = pool[0]
        else:
            a, b = rng.sample(pool, 2)
            better = (score(a) >= score(b)) if binpack else (score(a) <= score(b))
            pick = a if better else b
        order.append(pick.name)
        pool.remove(pick)
    return order
