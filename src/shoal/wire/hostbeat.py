"""One heartbeat per agent process, not one per node: the keys, chunks and expansion.

An agent process serving many nodes (``shoal agent --virtual N``) writes what its nodes share
(labels, capacity, load, version, address, ...) once, and per node only what differs (name,
live sessions, state), in chunks of ``CHUNK`` nodes under ``_h-<host>-<chunk>`` in the
heartbeats bucket (one subject token: agents may only write ``$KV.<bucket>.<token>``): 10 puts
per beat for 10,000 nodes instead of 10,000. Controllers expand a chunk back into one
``NodeInfo`` per node, so the node record the API serves is unchanged.

Node names start with a letter or digit, so no node key can look like a host key; keys
without the prefix are a per-node ``NodeInfo`` (as older agents write them), still read.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct

from .messages import NodeInfo, NodeState

KEY_PREFIX = "_h-"
CHUNK = 1000  # nodes per key: ~25 KB of JSON, far under any NATS max_payload


# Every node silent at once for between half a TTL and this many TTLs is a paused bus (a
# stream electing a leader), not a dead fleet: controllers give no verdict ("down", "no node
# has room") in it, and a connected agent does not fence itself in it.
PAUSE_VERDICT = 3


class NodeBeat(Struct, frozen=True, array_like=True):
    """What one node of the process says that its siblings may not: ``[name, sessions, state]``."""

    name: str
    sessions: int = 0
    state: NodeState = "ready"


class HostBeat(Struct, frozen=True):
    """One chunk of one agent process's nodes. ``lead`` is the process's first node: run
    batches for any of its nodes are addressed to it (``shoal.agent.<lead>.runs``)."""

    host: str
    lead: str
    common: NodeInfo  # ``name`` empty; everything else holds for every node below
    nodes: list[NodeBeat]


def is_host_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX)


def host_keys(host: str, n_nodes: int, chunk: int = CHUNK) -> list[str]:
    """The keys of a process with ``n_nodes`` nodes (one at least)."""
    return [f"{KEY_PREFIX}{host}-{i}" for i in range(max(1, -(-n_nodes // chunk)))]


def split(host: str, lead: str, common: NodeInfo, nodes: list[NodeBeat],
          chunk: int = CHUNK) -> list[tuple[str, HostBeat]]:
    """The beats to put, one per key, in the order of ``nodes``."""
    common = msgspec.structs.replace(common, name="")
    keys = host_keys(host, len(nodes), chunk)
    return [(key, HostBeat(host, lead, common, nodes[i * chunk:(i + 1) * chunk]))
            for i, key in enumerate(keys)]


def expand(beat: HostBeat) -> list[NodeInfo]:
    """The node records a chunk stands for."""
    base = beat.common
    return [msgspec.structs.replace(base, name=n.name, sessions=n.sessions, state=n.state)
            for n in beat.nodes]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(HostBeat)


def encode(beat: HostBeat) -> bytes:
    return _encoder.encode(beat)


def decode(data: bytes) -> HostBeat:
    return _decoder.decode(data)
