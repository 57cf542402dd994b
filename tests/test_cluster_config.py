"""The pure parts of running on a NATS cluster: each server's configuration, the replica
count, and how ``shoal up`` lays out its processes. No sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.client.aio import controller_urls
from shoal.config import ControllerConfig, NatsConfig, load
from shoal.errors import ConfigError
from shoal.natsio import replicas
from shoal.natsio.natsd import (
    ACCOUNT,
    ClusterPeer,
    ClusterSpec,
    JwtAuth,
    LeafListen,
    NatsUsers,
    agent_permissions,
    leaf_server_config,
    server_config,
)
from shoal.up import agent_groups, rotate, split_ports, spread

USERS = NatsUsers("ctl-pw", "agent-pw", "route-pw")
SPEC = ClusterSpec("shoal", (ClusterPeer("n1", 4001, 6001), ClusterPeer("n2", 4002, 6002),
                             ClusterPeer("n3", 4003, 6003)))


def test_a_clustered_server_routes_to_the_others_with_a_password() -> None:
    conf = json.loads(server_config(4002, Path("/s/n2"), USERS, cluster=SPEC,
                                    server_name="n2"))
    assert conf["server_name"] == "n2"
    assert conf["port"] == 4002 and conf["host"] == "127.0.0.1"
    cluster = conf["cluster"]
    assert cluster["name"] == "shoal" and cluster["port"] == 6002
    assert cluster["host"] == "127.0.0.1"
    # Routes must authenticate: an open route port lets any local user join the cluster.
    assert cluster["authorization"] == {"user": "route", "password": "route-pw"}
    assert cluster["routes"] == ["nats-route://route:route-pw@127.0.0.1:6001",
                                 "nats-route://route:route-pw@127.0.0.1:6003"]
    assert conf["jetstream"]["store_dir"] == "/s/n2"


def test_a_lone_server_has_no_cluster_block() -> None:
    conf = json.loads(server_config(4222, Path("/s"), USERS))
    assert "cluster" not in conf and "server_name" not in conf


def test_a_cluster_without_a_route_password_is_refused() -> None:
    with pytest.raises(ConfigError, match="route password"):
        server_config(4001, Path("/s"), NatsUsers("a", "b"), cluster=SPEC, server_name="n1")


def test_cluster_ports_are_distinct() -> None:
    spec = ClusterSpec.allocate(5)
    ports = [p.port for p in spec.peers] + [p.route_port for p in spec.peers]
    assert len(set(ports)) == 10
    assert [p.name for p in spec.peers] == ["n1", "n2", "n3", "n4", "n5"]
    fixed = ClusterSpec.allocate(3, first_port=5000)
    assert [(p.port, p.route_port) for p in fixed.peers] == [(5000, 5003), (5001, 5004),
                                                            (5002, 5005)]
    with pytest.raises(ConfigError):
        ClusterSpec.allocate(0)


@pytest.mark.parametrize(("configured", "size", "want"), [
    (0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 5, 3), (0, 9, 3),  # automatic: 3, or fewer servers
    (1, 3, 1), (5, 5, 5), (3, 1, 1),  # explicit, but never more than there are servers
])
def test_replicas_wanted(configured: int, size: int, want: int) -> None:
    assert replicas.wanted(configured, size) == want


def test_the_replica_default_is_automatic_and_bounded() -> None:
    assert ControllerConfig().replicas == 0
    with pytest.raises(ConfigError):
        load(ControllerConfig, None, {"replicas": 7})
    with pytest.raises(ConfigError):
        load(ControllerConfig, None, {"replicas": -1})


def test_advice_names_every_asset_below_the_count() -> None:
    found = [replicas.Asset("KV_shoal-sessions", 1, 1), replicas.Asset("shoal-output", 3, 3),
             replicas.Asset("KV_shoal-registry", 2, 2)]
    text = replicas.advice(found, 3, 3)
    assert text is not None
    assert "KV_shoal-sessions (R1)" in text and "KV_shoal-registry (R2)" in text
    assert "shoal-output" not in text and "shoal admin upgrade-replicas" in text
    assert replicas.advice(found, 1, 1) is None
    assert [a.stream for a in replicas.lagging(found, 2)] == ["KV_shoal-sessions"]


def test_only_shoal_streams_are_touched() -> None:
    assert replicas.is_shoal_stream("KV_shoal-sessions")
    assert replicas.is_shoal_stream("shoal-output")
    assert not replicas.is_shoal_stream("KV_other")
    assert not replicas.is_shoal_stream("orders")


def test_each_process_prefers_its_own_server_and_knows_all() -> None:
    urls = ["nats://a", "nats://b", "nats://c"]
    assert rotate(urls, 0) == "nats://a,nats://b,nats://c"
    assert rotate(urls, 1) == "nats://b,nats://c,nats://a"
    assert rotate(urls, 5) == "nats://c,nats://a,nats://b"


@given(st.integers(0, 50), st.integers(1, 9))
def test_spread_deals_every_name_once(count: int, groups: int) -> None:
    names = [f"node-{i}" for i in range(count)]
    dealt = spread(names, groups)
    assert sorted(n for g in dealt for n in g) == sorted(names)
    assert len(dealt) == min(count, groups) and all(dealt)
    sizes = [len(g) for g in dealt]
    assert not sizes or max(sizes) - min(sizes) <= 1


@given(st.integers(0, 200), st.integers(1, 5), st.integers(0, 64))
def test_agent_groups_deal_every_name_once_within_a_credential(count: int, servers: int,
                                                                per: int) -> None:
    names = [f"node-{i}" for i in range(1, count + 1)]
    groups = agent_groups(names, servers, per)
    assert sorted(n for _, g in groups for n in g) == sorted(names)
    assert all(g and (not per or len(g) <= per) for _, g in groups)
    shares = spread(names, servers)
    # Each group lies within the share of the server it prefers.
    assert all(0 <= i < len(shares) and set(g) <= set(shares[i]) for i, g in groups)
    if not per:
        assert [g for _, g in groups] == shares


def test_agent_groups_one_credential_per_node() -> None:
    assert agent_groups(["a", "b", "c"], 1, 1) == [(0, ["a"]), (0, ["b"]), (0, ["c"])]
    assert agent_groups(["a", "b", "c", "d"], 2, 1) == [(0, ["a"]), (0, ["c"]), (1, ["b"]),
                                                        (1, ["d"])]
    assert agent_groups(["a", "b", "c"], 1, 2) == [(0, ["a", "b"]), (0, ["c"])]


def test_every_server_of_an_operator_mode_cluster_trusts_the_operator() -> None:
    """Node identities on a cluster: the same operator, system account and preloaded
    accounts on each server, a full resolver with a directory of its own, the routes as
    in password mode, and no users or passwords for clients anywhere."""
    jwt = JwtAuth("OPJWT", "ASYS", {"ASYS": "SYSJWT", "ASHOAL": "ACCJWT"})
    for me in ("n1", "n2", "n3"):
        conf = json.loads(server_config(4001, Path(f"/s/{me}/jetstream"), USERS, cluster=SPEC,
                                        server_name=me, jwt=jwt))
        assert "accounts" not in conf
        assert (conf["operator"], conf["system_account"]) == ("OPJWT", "ASYS")
        assert conf["resolver_preload"] == {"ASYS": "SYSJWT", "ASHOAL": "ACCJWT"}
        assert conf["resolver"]["type"] == "full"
        assert conf["resolver"]["dir"] == f"/s/{me}/accounts"
        assert conf["cluster"]["authorization"] == {"user": "route", "password": "route-pw"}
        assert len(conf["cluster"]["routes"]) == 2
        # A node credential's JWT rides in the CONNECT line: ~45 KB for 64 nodes.
        assert conf["max_control_line"] >= 64 << 10


def test_port_ranges_do_not_overlap() -> None:
    assert split_ports("20000-29999", 3) == ["20000-23332", "23333-26665", "26666-29998"]
    assert split_ports("20000-29999", 1) == ["20000-29999"]
    with pytest.raises(ConfigError, match="too small"):
        split_ports("5000-5001", 3)


def test_controller_urls_list() -> None:
    assert controller_urls("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    assert controller_urls("http://a:1") == ["http://a:1"]


def test_nats_servers_are_tried_in_random_order_unless_told() -> None:
    assert NatsConfig().randomize is True
    cfg = load(ControllerConfig, None, {"nats": {"randomize": "false"}})
    assert cfg.nats.randomize is False


LEAF_USERS = NatsUsers("ctl-pw", "agent-pw", "route-pw", "leaf-pw")


def test_a_hub_accepts_leaf_nodes_only_with_the_leaf_password() -> None:
    conf = json.loads(server_config(4222, Path("/s"), LEAF_USERS,
                                    leafnodes=LeafListen("10.71.0.1", 7422)))
    leaf = conf["leafnodes"]
    assert leaf["host"] == "10.71.0.1" and leaf["port"] == 7422
    # Bound to shoal's account: a leaf connection sees the fleet's subjects and streams.
    assert leaf["authorization"] == {"users": [{"user": "leaf", "password": "leaf-pw",
                                                "account": ACCOUNT}]}
    assert conf["jetstream"]["domain"] == "hub"  # what a site's leaf server maps onto
    assert "leafnodes" not in json.loads(server_config(4222, Path("/s"), LEAF_USERS))
    with pytest.raises(ConfigError, match="leaf password"):
        server_config(4222, Path("/s"), USERS, leafnodes=LeafListen("127.0.0.1", 7422))


def test_a_leaf_server_dials_every_hub_and_serves_agents_only() -> None:
    hubs = [LeafListen("10.71.0.1", 7422), LeafListen("10.71.0.1", 7423)]
    conf = json.loads(leaf_server_config(4300, LEAF_USERS, hubs, server_name="site-1"))
    assert conf["port"] == 4300 and conf["host"] == "127.0.0.1"
    assert conf["server_name"] == "site-1"
    assert conf["leafnodes"]["remotes"] == [{
        "urls": ["nats-leaf://leaf:leaf-pw@10.71.0.1:7422",
                 "nats-leaf://leaf:leaf-pw@10.71.0.1:7423"],
        "account": ACCOUNT}]
    # No JetStream of its own (the hub's serves the site), no listener for other servers,
    # and only the agent user, with the agent's permissions: a site holds no controller
    # credential.
    assert "jetstream" not in conf and "cluster" not in conf
    users = conf["accounts"][ACCOUNT]["users"]
    assert [u["user"] for u in users] == ["agent"]
    assert users[0]["password"] == "agent-pw"
    perms = users[0]["permissions"]
    assert perms["subscribe"] == agent_permissions()["subscribe"]
    allowed = perms["publish"]["allow"]
    # The agent's own names, and the hub domain's that the site maps them to (permissions
    # are checked after the mapping), and nothing else.
    assert set(agent_permissions()["publish"]["allow"]) <= set(allowed)
    extra = set(allowed) - set(agent_permissions()["publish"]["allow"])
    assert extra and all(x.startswith("$JS.hub.API.") for x in extra)
    assert "$JS.hub.API.$KV.shoal-heartbeats.*" in extra
    assert conf["accounts"][ACCOUNT]["mappings"] == {"$JS.API.>": "$JS.hub.API.>",
                                                     "$KV.>": "$JS.hub.API.$KV.>"}
    assert conf["ping_interval"] and conf["ping_max"] >= 2  # a cut link is noticed soon


def test_a_leaf_server_without_hub_or_password_is_refused() -> None:
    with pytest.raises(ConfigError, match="hub's leafnodes address"):
        leaf_server_config(4300, LEAF_USERS, [])
    with pytest.raises(ConfigError, match="leaf password"):
        leaf_server_config(4300, USERS, [LeafListen("127.0.0.1", 7422)])
