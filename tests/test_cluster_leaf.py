"""A site behind a leaf node: its agent connects to a nats-server in leaf mode inside a
network namespace of its own, which dials the hub over a veth pair. Cutting that link is a
partition of the whole site: the node is lost after the TTL, its ``restart=always`` daemon is
started elsewhere, and when the link heals the node comes back without a second copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import SHOAL, Fleet, processes_with_env, wait_for
from shoal import config as c
from shoal.natsio.natsd import LeafListen, LeafServer, NatsServer, NatsUsers, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")


@pytest.fixture
def site() -> Iterator[tuple[str, str, str]]:
    """A namespace "site" joined to this one by a veth pair: 10.71.N.1 here (the hub's
    leafnodes listener binds it), 10.71.N.2 there. Made and removed here."""
    tag = os.urandom(3).hex()
    ns, here, there = f"shoal-site-{tag}", f"slh{tag}", f"sls{tag}"
    net = int(tag[:2], 16)
    hub_ip, site_ip = f"10.71.{net}.1", f"10.71.{net}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        ip("addr", "add", f"{hub_ip}/24", "dev", here)
        ip("link", "set", here, "up")
        ip("-n", ns, "addr", "add", f"{site_ip}/24", "dev", there)
        ip("-n", ns, "link", "set", there, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, there, hub_ip
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def copies(marker: str) -> list[int]:
    """Live processes of the daemon (its environment carries ``marker``), on any node."""
    return sorted(p.pid for p in processes_with_env("DAEMON_MARK", marker))


@pytest.mark.timeout(120)
def test_a_partitioned_site_is_lost_and_heals_without_a_second_daemon(
        tmp_path: Path, site: tuple[str, str, str]) -> None:
    ns, link, hub_ip = site
    home = tmp_path / "home"
    home.mkdir()
    users = NatsUsers.generate()
    hub_leaf = LeafListen(hub_ip, free_port(hub_ip))
    hub = NatsServer(tmp_path / "hub", users, leafnodes=hub_leaf)
    hub.start()
    leaf = LeafServer(tmp_path / "leaf", users, [hub_leaf], server_name="site-1", netns=ns)
    fleet = Fleet(home, agents=0)
    try:
        leaf.start()
        token = c.new_secret()
        c.save(home / "controller.toml", c.ControllerConfig(
            nats=c.NatsConfig(url=hub.url, user="controller", password=users.controller_password),
            port=0, services_port=0, token=token))
        _, fleet.url = fleet.controller()
        fleet.token = token
        c.save(home / "client.toml", c.ClientConfig(url=fleet.url, token=token))
        c.save(home / "agent.toml", c.AgentConfig(nats=c.NatsConfig(
            url=hub.url, user="agent", password=users.agent_password), address="127.0.0.1"))
        site_cfg = tmp_path / "site-agent.toml"
        c.save(site_cfg, c.AgentConfig(
            nats=c.NatsConfig(url=leaf.url, user="agent", password=users.agent_password),
            address="127.0.0.1", state_dir=str(tmp_path / "site-state")))
        log = open(home / "agent-site-1.log", "w")  # noqa: SIM115
        fleet.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, SHOAL, "agent", "--name", "site-1", "--config",
             str(site_cfg)], env=fleet.env, stdout=log, stderr=subprocess.STDOUT, text=True))
        log.close()
        fleet.wait_nodes(["site-1"])

        # The daemon goes to the site (the only node yet), then a node joins at the hub.
        marker = os.urandom(4).hex()
        r = fleet.shoal("session", "create", "--restart", "always", "-e",
                        f"DAEMON_MARK={marker}", "--", "sleep", "1000")
        assert r.returncode == 0, r.stderr
        sid = r.stdout.strip()
        wait_for(lambda: fleet.shoal("session", "show", sid).stdout.count('"running"'),
                 timeout=20)
        assert '"node":"site-1"' in fleet.shoal("session", "show", sid).stdout
        assert len(copies(marker)) == 1
        fleet.agent("home-1")

        # Cut the site off, longer than node_ttl.
        subprocess.run(["ip", "-n", ns, "link", "set", link, "down"], check=True)
        cut_at = time.monotonic()
        fleet.wait_nodes(["site-1"], state="down", timeout=40)
        lost_after = time.monotonic() - cut_at

        def moved() -> bool:
            out = fleet.shoal("session", "show", sid).stdout
            return '"node":"home-1"' in out and '"state":"running"' in out

        wait_for(moved, timeout=40, interval=0.5)
        moved_after = time.monotonic() - cut_at
        during = len(copies(marker))  # the site's copy, cut off, may still run

        subprocess.run(["ip", "-n", ns, "link", "set", link, "up"], check=True)
        healed_at = time.monotonic()
        fleet.wait_nodes(["site-1"], timeout=60)
        back_after = time.monotonic() - healed_at
        print(f"site lost {lost_after:.1f}s after the cut, daemon running elsewhere after "
              f"{moved_after:.1f}s ({during} copies during the cut); node back "
              f"{back_after:.1f}s after the heal")
        # After a bounded time exactly one copy runs, and it is the one the record names.
        wait_for(lambda: len(copies(marker)) == 1, timeout=40, interval=0.5)
        one_after = time.monotonic() - healed_at
        assert moved()
        [survivor] = copies(marker)  # the hub side's copy, not the returning site's
        assert os.readlink(f"/proc/{survivor}/ns/net") == os.readlink("/proc/self/ns/net")
        time.sleep(5)  # and it stays so
        assert copies(marker) == [survivor]
        print(f"one copy {one_after:.1f}s after the heal")
    finally:
        fleet.stop()
        leaf.stop()
        hub.stop()
