"""Fleet-scale logic without sockets: per-process heartbeats, the registry built from them,
run batches grouped by agent process, and the node listing's filters, pages and summary."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from types import SimpleNamespace

import msgspec
import pytest

from shoal.agent.host import split_batch
from shoal.cli.tables import write_json_pages
from shoal.controller import nodelist
from shoal.controller.registry import NodeRegistry, group_by_lead
from shoal.errors import ValidationError
from shoal.logic.nodeset import natural_key
from shoal.wire import hostbeat
from shoal.wire import messages as m

KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
COMMON = m.NodeInfo(name="v-1", labels={"zone": "a"}, capacity=4, version="1.2",
                    address="10.0.0.1", hostname="h1", pid=42, last_seen=123.0,
                    network="none", load=m.Load(0.5, 10.0, 20.0))


def _beats(host: str, names: list[str], chunk: int = hostbeat.CHUNK
           ) -> list[tuple[str, hostbeat.HostBeat]]:
    nodes = [hostbeat.NodeBeat(n, sessions=i % 3, state="draining" if i == 1 else "ready")
             for i, n in enumerate(names)]
    return hostbeat.split(host, names[0], COMMON, nodes, chunk)


# ---------------------------------------------------------------------- host beats


def test_a_process_beats_in_chunks_that_expand_to_the_node_records() -> None:
    names = [f"v-{i}" for i in range(1, 2501)]
    beats = _beats("abc123", names)
    assert [k for k, _ in beats] == hostbeat.host_keys("abc123", 2500)
    assert len(beats) == 3 and [len(b.nodes) for _, b in beats] == [1000, 1000, 500]
    for key, _ in beats:
        # One subject token (agents may only write $KV.<bucket>.<token>), a valid KV key,
        # and never a node name (those start with a letter or digit).
        assert "." not in key and KV_KEY.match(key) and hostbeat.is_host_key(key)
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(key, m.NodeName)
    decoded = [hostbeat.decode(hostbeat.encode(b)) for _, b in beats]
    infos = [info for b in decoded for info in hostbeat.expand(b)]
    assert [i.name for i in infos] == names
    assert infos[1].state == "draining" and infos[2].sessions == 2
    assert infos[7] == msgspec.structs.replace(COMMON, name="v-8", sessions=1)
    assert all(b.lead == "v-1" and b.host == "abc123" for b in decoded)
    # The shared fields go once per chunk: far smaller than one NodeInfo per node.
    per_node = sum(len(msgspec.json.encode(i)) for i in infos)
    assert sum(len(hostbeat.encode(b)) for b in decoded) * 5 < per_node


def test_a_one_node_process_has_one_key() -> None:
    assert hostbeat.host_keys("h", 1) == ["_h-h-0"]
    assert hostbeat.host_keys("h", 0) == ["_h-h-0"]
    assert len(hostbeat.host_keys("h", 1001)) == 2


def _registry() -> NodeRegistry:
    # The registry's beat handling is pure; its buckets are only used by start() and
    # forget(), never here. A bare stand-in satisfies the constructor (it asks the heartbeats
    # handle for its connection, to watch for reconnects).
    bucket = SimpleNamespace(_js=SimpleNamespace(_nc=None))
    return NodeRegistry(bucket, bucket, node_ttl=60.0)  # type: ignore[arg-type]


def test_the_registry_learns_nodes_and_their_process_from_host_beats() -> None:
    reg = _registry()
    for key, beat in _beats("p1", ["v-1", "v-2", "v-3"]):
        reg._on_beat(key, hostbeat.encode(beat))
    reg._on_beat("old-1", msgspec.json.encode(msgspec.structs.replace(COMMON, name="old-1")))
    assert reg.names() == ["old-1", "v-1", "v-2", "v-3"]
    assert reg.node("v-2").state == "draining"  # type: ignore[union-attr]
    assert reg.groups(["v-1", "old-1", "v-3"]) == [(None, ["old-1"]), ("v-1", ["v-1", "v-3"])]
    # The process stops: its key is deleted, its nodes are down (the registry bucket keeps
    # them known), and a run no longer batches them.
    reg._on_register("v-1", msgspec.json.encode(msgspec.structs.replace(COMMON, name="v-1")))
    reg._on_beat("_h-p1-0", None)
    assert reg.node("v-1").state == "down"  # type: ignore[union-attr]
    assert reg.node("v-2") is None or reg.node("v-2").state == "down"  # type: ignore[union-attr]
    assert reg.groups(["v-1", "v-3"]) == [(None, ["v-1"]), (None, ["v-3"])]


def test_a_restarted_process_keeps_its_nodes_when_the_old_key_goes() -> None:
    reg = _registry()
    for key, beat in _beats("old", ["v-1", "v-2"]):
        reg._on_beat(key, hostbeat.encode(beat))
    for key, beat in _beats("new", ["v-1", "v-2"]):
        reg._on_beat(key, hostbeat.encode(beat))
    reg._on_beat("_h-old-0", None)  # the old key's delete comes after the new beat
    assert reg.node("v-1").state == "ready"  # type: ignore[union-attr]
    assert reg.groups(["v-1", "v-2"]) == [("v-1", ["v-1", "v-2"])]


def test_an_undecodable_host_beat_changes_nothing() -> None:
    reg = _registry()
    key, beat = _beats("p", ["v-1", "v-2"])[0]
    reg._on_beat(key, hostbeat.encode(beat))
    reg._on_beat(key, b'{"host": 1}')
    assert reg.node("v-1").state == "ready"  # type: ignore[union-attr]


def test_groups_batch_only_several_nodes_of_one_process() -> None:
    leads = {"a-1": ("k1", "a-1"), "a-2": ("k1", "a-1"), "b-1": ("k2", "b-1"),
             "a-3": ("k2b", "a-1")}  # a second chunk of the same process
    assert group_by_lead(["a-1", "b-1", "x", "a-3", "a-2"], leads) == [
        (None, ["x"]), ("a-1", ["a-1", "a-3", "a-2"]), (None, ["b-1"])]
    assert group_by_lead([], leads) == []


def test_an_agent_takes_its_own_nodes_of_a_batch_once() -> None:
    assert split_batch(["v-2", "x", "v-1", "v-2", "y"], {"v-1", "v-2"}) == (
        ["v-2", "v-1"], ["x", "y"])


def test_batch_messages_round_trip_and_are_bounded() -> None:
    batch = m.RunBatch(run_id="r1", spec=m.RunSpec(argv=["true"]), nodes=["v-1", "v-2"])
    assert m.unpack(m.pack(batch), m.RunBatch) == batch
    with pytest.raises(msgspec.ValidationError):
        m.unpack(m.pack(msgspec.structs.replace(batch, nodes=[])), m.RunBatch)
    with pytest.raises(msgspec.ValidationError):
        m.unpack(m.pack(msgspec.structs.replace(batch, nodes=["a.b"])), m.RunBatch)
    started = m.RunBatchStarted(started=[("v-1", 10), ("v-2", 11)])
    assert m.unpack_agent_event_frame(m.pack(started)) == started


# ---------------------------------------------------------------------- listing


def _node(name: str, state: m.NodeState = "ready", **kw: object) -> m.NodeInfo:
    return m.NodeInfo(name=name, state=state, **kw)  # type: ignore[arg-type]


def test_the_listing_filters_by_state_text_and_node_set() -> None:
    nodes = [_node("web1", labels={"role": "front"}), _node("web2", "down"),
             _node("db1", address="10.1.1.1"), _node("db2", hostname="Big-Iron")]
    pick = lambda **kw: [n.name for n in nodes if nodelist.matcher(**kw)(n)]  # noqa: E731
    assert pick(state="down") == ["web2"]
    assert pick(text="ROLE=front") == ["web1"]
    assert pick(text="10.1.") == ["db1"]
    assert pick(text="big-iron") == ["db2"]
    assert pick(names=nodelist.parse_nodeset("web[1-2],db2"), state="ready") == ["web1", "db2"]
    with pytest.raises(ValidationError, match="state must be one of"):
        nodelist.matcher(state="up")
    for bad in ("web[1-", "a,,b", "web[1-2]]"):
        with pytest.raises(ValidationError, match="bad node set"):
            nodelist.parse_nodeset(bad)
    assert sorted(nodelist.parse_nodeset("w[1-2],x[01-02]")) == ["w1", "w2", "x01", "x02"]


def test_a_node_set_that_would_fill_memory_is_refused_early() -> None:
    # Each element is within the node set's own cap; together they are 10 million names.
    text = ",".join(f"x{i}-[1-99999]" for i in range(100))
    with pytest.raises(ValidationError, match="more than 100,000"):
        nodelist.parse_nodeset(text)


def test_pages_follow_natural_order_from_any_name() -> None:
    names = sorted([f"n{i}" for i in range(1, 31)], key=natural_key)
    keys = [natural_key(n) for n in names]
    assert nodelist.start_after(names, keys, "") == 0
    assert names[nodelist.start_after(names, keys, "n9")] == "n10"
    assert names[nodelist.start_after(names, keys, "n10a")] == "n11"  # not a known name
    assert nodelist.start_after(names, keys, "n30") == 30
    # Walking pages of 7 visits every name once.
    seen, after = [], ""
    while True:
        i = nodelist.start_after(names, keys, after)
        page = names[i:i + 7]
        seen += page
        if len(page) < 7:
            break
        after = page[-1]
    assert seen == names


def test_the_summary_counts_what_a_table_would_show() -> None:
    nodes = [_node(f"v{i}", "down" if i % 10 == 0 else "ready", capacity=2, sessions=1,
                   version="1.0" if i < 5 else "1.1", hostname=f"h{i % 2}", pid=i % 2,
                   network="none", labels={"id": str(i), "zone": "a"}) for i in range(50)]
    s = nodelist.summarise(nodes)
    assert s.nodes == 50 and s.states == {"ready": 45, "draining": 0, "down": 5}
    assert (s.sessions, s.capacity) == (45, 90)  # nodes that are up
    assert s.versions == {"1.1": 41, "1.0": 4} or s.versions == {"1.1": 45, "1.0": 5}
    assert s.agents == 2 and s.hosts == 2 and s.network == {"none": 45}
    assert s.labels["zone"] == {"a": 50}
    # A label with a value per node is capped, the rest counted.
    assert len(s.labels["id"]) == nodelist.MAX_LABEL_VALUES + 1
    assert s.labels["id"]["…others"] == 50 - nodelist.MAX_LABEL_VALUES
    empty = nodelist.summarise([])
    assert empty.nodes == 0 and empty.states == {"ready": 0, "draining": 0, "down": 0}


def test_json_pages_are_joined_into_one_array_without_decoding() -> None:
    def pages(*bodies: bytes) -> Iterator[bytes]:
        yield from bodies

    for bodies in [(b'[{"a":1},{"a":2}]', b"[]", b'[{"a":3}]\n'), (), (b"[]",)]:
        out = io.BytesIO()
        write_json_pages(out, pages(*bodies))
        expected = [x for b in bodies for x in msgspec.json.decode(b)]
        assert msgspec.json.decode(out.getvalue()) == expected
