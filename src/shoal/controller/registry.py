"""The controller's view of the nodes: a cache fed by watching the node buckets.

It is only a cache of what NATS holds, rebuilt from the buckets on start, so the
controller stays stateless. A node is up while its heartbeat key exists and was refreshed
within the node TTL; a node in the registry bucket without a heartbeat is down. Heartbeats
come per agent process (``shoal.wire.hostbeat``), one key per chunk of its nodes, or per node from
older agents; the cache also remembers which nodes share a process, so that a run reaches
them with one request (``groups``).

After a NATS outage the view is not *settled* until every known node has beaten again, or
one node TTL after the watches are armed again: agents that could not beat meanwhile get
that long to be heard, and until then "no node is up" is not an answer this controller may
give (``settled``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from ..logic.nodeset import NaturalKey, natural_key
from ..natsio.bus import client_of, watch_bucket
from ..system.tasks import end_tasks
from ..wire import hostbeat
from ..wire.messages import NodeInfo

if TYPE_CHECKING:
    from ..natsio.types import KeyValue

log = logging.getLogger(__name__)



def _chunk_host(key: str) -> str:
    """``_h-<host>-<chunk>`` -> ``<host>``."""
    return key[len(hostbeat.KEY_PREFIX):].rsplit("-", 1)[0]


class NodeRegistry:
    def __init__(self, heartbeats: KeyValue, registry: KeyValue, node_ttl: float) -> None:
        self._hb_kv = heartbeats
        self._reg_kv = registry
        self.node_ttl = node_ttl
        self._beats: dict[str, tuple[NodeInfo, float]] = {}  # name -> (info, monotonic seen)
        self._known: dict[str, NodeInfo] = {}
        self._lead: dict[str, tuple[str, str]] = {}  # node -> (host key, its process's lead)
        self._chunks: dict[str, list[str]] = {}  # host key -> its nodes
        self._sorted: list[str] | None = None  # names in natural order, while none came or went
        self._keys: list[NaturalKey] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._pending_initial = 2
        self._nc = client_of(heartbeats)
        self._armed_at = -1  # reconnect count when the heartbeats watch last loaded
        self._settle_until = 0.0
        self._heard: set[str] | None = None  # nodes that beat since the last re-watch
        # Node identities: whether the process whose lead is the first name may speak for
        # the second. The server lets a node write only its own lead's heartbeat keys; what
        # a chunk lists inside is checked here.
        self.vouch: Callable[[str, str], bool] | None = None

    def require(self, vouch: Callable[[str, str], bool]) -> None:
        """From now on take from a heartbeat chunk only the nodes ``vouch`` allows its
        lead, and drop those already taken that it does not."""
        self.vouch = vouch
        for key, names in list(self._chunks.items()):
            host = _chunk_host(key)
            for name in [n for n in names if not vouch(host, n)]:
                names.remove(name)
                self._beats.pop(name, None)
                self._lead.pop(name, None)
                if self._known.pop(name, None) is not None:
                    self._sorted = None

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(watch_bucket(self._hb_kv, self._on_beat, self._beats_loaded,
                                             "heartbeats")),
            asyncio.create_task(watch_bucket(self._reg_kv, self._on_register,
                                             self._initial_loaded, "registry"))]
        try:
            await asyncio.wait_for(self._ready.wait(), 10)
        except TimeoutError:
            log.warning("node buckets slow to load; continuing with a partial view")

    async def stop(self) -> None:
        await end_tasks(self._tasks)

    def _beats_loaded(self) -> None:
        reconnects = self._nc.stats["reconnects"]
        if self._armed_at >= 0 and reconnects != self._armed_at:  # a re-watch after an outage
            self._settle_until = time.monotonic() + self.node_ttl
            self._heard = set()
        self._armed_at = reconnects
        self._initial_loaded()

    def settled(self) -> bool:
        """True when this view may be trusted to say a node is down or that none has room:
        connected, watching since the last reconnect, and past the settle window."""
        if not self._nc.is_connected or self._armed_at != self._nc.stats["reconnects"]:
            return False
        if self._known and self.node_ttl / 2 < time.monotonic() - self._last_beat \
                < hostbeat.PAUSE_VERDICT * self.node_ttl:
            return False  # no node beats at all: the bus paused (a stream electing a leader)
        if self._heard is not None and self._heard >= self._known.keys():
            self._settle_until = 0.0  # every node spoke up: no need to wait longer
        return time.monotonic() >= self._settle_until

    def settles_in(self) -> float:
        """Seconds until ``settled`` may become true (a hint for Retry-After)."""
        return max(1.0, self._settle_until - time.monotonic())

    def _initial_loaded(self) -> None:
        # Called once per bucket, and again after a re-watch (then it changes nothing).
        self._pending_initial -= 1
        if self._pending_initial <= 0:
            self._ready.set()

    @staticmethod
    def _decode(value: bytes | None) -> NodeInfo | None:
        if not value:
            return None
        try:
            return msgspec.json.decode(value, type=NodeInfo)
        except msgspec.DecodeError:
            return None

    _last_beat = 0.0
    _resumed = 0.0  # when beats came back after every node fell silent at once

    def fresh(self) -> bool:
        """True while heartbeats are arriving at all (our view of the fleet is current),
        and have been for a whole TTL since they last stopped all together. When every
        node is silent at once, the bus paused (a NATS server lost, the heartbeat stream
        electing a new leader, our own reconnect), not the fleet: after it, the first beats
        back must not make the nodes whose beats are still on their way look down."""
        now = time.monotonic()
        return now - self._last_beat < self.node_ttl and now - self._resumed >= self.node_ttl

    def _on_beat(self, key: str, value: bytes | None) -> None:
        if hostbeat.is_host_key(key):
            self._on_host_beat(key, value)
            return
        info = self._decode(value)
        if info is None:
            self._beats.pop(key, None)
            return
        now = self._beat_arrived()
        if self._heard is not None:
            self._heard.add(key)
        self._beats[key] = (info, now)
        self._learn(key, info)
        self._lead.pop(key, None)

    def _beat_arrived(self) -> float:
        now = time.monotonic()
        if now - self._last_beat > self.node_ttl / 2:
            self._resumed = now
        self._last_beat = now
        return now

    def _on_host_beat(self, key: str, value: bytes | None) -> None:
        beat = None
        if value:
            try:
                beat = hostbeat.decode(value)
            except msgspec.DecodeError:
                log.warning("undecodable heartbeat under %s", key)
                return
        if beat is None:  # the process stopped (or the key was purged)
            for name in self._chunks.pop(key, []):
                if self._lead.get(name, ("",))[0] == key:
                    del self._lead[name]
                    self._beats.pop(name, None)
            return
        now = self._beat_arrived()
        names = []
        lead = (key, beat.lead)
        infos = hostbeat.expand(beat)
        if self.vouch is not None:
            host, vouch = _chunk_host(key), self.vouch
            refused = [i.name for i in infos if not vouch(host, i.name)]
            if refused:
                log.warning("heartbeat %s names nodes its credential was not enrolled for: %s "
                            "(ignored)", key, ", ".join(refused[:10]))
                infos = [i for i in infos if i.name not in refused]
        for info in infos:
            self._beats[info.name] = (info, now)
            self._learn(info.name, info)
            self._lead[info.name] = lead
            names.append(info.name)
        if self._heard is not None:
            self._heard.update(names)
        self._chunks[key] = names

    def _learn(self, name: str, info: NodeInfo) -> None:
        if name not in self._known:
            self._sorted = None
        self._known[name] = info

    def _on_register(self, key: str, value: bytes | None) -> None:
        info = self._decode(value)
        if info is None:
            if self._known.pop(key, None) is not None:
                self._sorted = None
        elif key not in self._beats:
            self._learn(key, info)

    async def forget(self, name: str) -> None:
        """Drop a node from the registry bucket (every controller's cache follows)."""
        await self._reg_kv.purge(name)
        self._known.pop(name, None)
        self._sorted = None

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def _silent_for(self, seen: float, now: float | None = None) -> float:
        # Time the bus was paused for everyone does not count against a node: after a
        # pause, each node has a whole TTL from the moment beats came back.
        return (time.monotonic() if now is None else now) - max(seen, self._resumed)

    def is_down(self, name: str) -> bool:
        beat = self._beats.get(name)
        return beat is None or self._silent_for(beat[1]) > self.node_ttl

    def node(self, name: str, now: float | None = None) -> NodeInfo | None:
        """One node with its current state (``down`` when its heartbeat lapsed)."""
        known = self._known.get(name)
        if known is None:
            return None
        beat = self._beats.get(name)
        if beat is not None and self._silent_for(beat[1], now) <= self.node_ttl:
            return beat[0]
        return msgspec.structs.replace(known, state="down")

    def snapshot(self) -> dict[str, NodeInfo]:
        """Every known node with its current state, in no particular order (this is on the
        path of every run and placement; ``listing`` sorts for people)."""
        now = time.monotonic()
        out = {}
        for name in self._known:
            info = self.node(name, now)
            if info is not None:
                out[name] = info
        return out

    def names(self) -> list[str]:
        """Every known node's name in natural order (sorted once per change of membership)."""
        return self.ordered()[0]

    def ordered(self) -> tuple[list[str], list[NaturalKey]]:
        """``names()`` and their natural sort keys (for paging with bisect)."""
        if self._sorted is None or len(self._sorted) != len(self._known):
            keyed = sorted((natural_key(n), n) for n in self._known)
            self._sorted = [n for _, n in keyed]
            self._keys = [k for k, _ in keyed]
        return self._sorted, self._keys

    def listing(self, names: list[str] | None = None) -> list[NodeInfo]:
        """Every known node (or those of ``names`` still known), in natural order of names."""
        out = []
        for name in self.names() if names is None else names:
            info = self.node(name)
            if info is not None:
                out.append(info)
        return out

    def groups(self, names: list[str]) -> list[tuple[str | None, list[str]]]:
        """``names`` grouped by the agent process serving them, as (lead, nodes): a run sends
        one request per group to its lead. A node whose process is not known (an older
        agent, or down) is a group of its own with lead None."""
        return group_by_lead(names, self._lead)


def group_by_lead(names: list[str], leads: dict[str, tuple[str, str]]
                  ) -> list[tuple[str | None, list[str]]]:
    """Pure part of ``NodeRegistry.groups``: ``leads`` maps node -> (host key, lead)."""
    by_lead: dict[str, list[str]] = {}
    out: list[tuple[str | None, list[str]]] = []
    for name in names:
        found = leads.get(name)
        if found is None:
            out.append((None, [name]))
        else:
            by_lead.setdefault(found[1], []).append(name)
    for lead, members in by_lead.items():
        if len(members) == 1:  # one node: the plain per-node request says the same
            out.append((None, members))
        else:
            out.append((lead, members))
    return out
