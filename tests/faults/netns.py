"""A host of its own for a partition case: a network namespace joined to this one by a veth
pair (``host_ip`` here, ``ip`` there). ``cut()`` pulls the cable (the namespace's end goes
down: its packets have no route, ours meet no carrier), ``heal()`` plugs it back.

Programs go in with ``nsenter --net`` rather than ``ip netns exec``: the latter also mounts a
sysfs of its own over /sys, which hides the cgroup hierarchies from an agent started there
(it would run its sessions uncontained, unlike every other node). Everything is removed on
exit, also when a test fails: processes still in the namespace (only ours can be: we made
it), then the veth, then the namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@dataclass
class Netns:
    name: str
    host_link: str  # our end of the veth
    link: str  # the namespace's end
    host_ip: str
    ip: str

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run inside the namespace (exec'd: the child's pid is the program's)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", *cmd]

    def cut(self) -> None:
        _ip("-n", self.name, "link", "set", self.link, "down")

    def heal(self) -> None:
        _ip("-n", self.name, "link", "set", self.link, "up")

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


def _free_subnet() -> int:
    """A third octet of 10.72.X.0/24 that no interface here uses yet."""
    used = _ip("-o", "-4", "addr")
    for _ in range(100):
        x = int.from_bytes(os.urandom(1), "big") % 250 + 1
        if f" 10.72.{x}." not in used:
            return x
    raise RuntimeError("no free 10.72.X.0/24 subnet for a test namespace")


@contextmanager
def netns() -> Iterator[Netns]:
    tag = os.urandom(3).hex()
    x = _free_subnet()
    ns = Netns(f"shoal-part-{tag}", f"sph{tag}", "eth0", f"10.72.{x}.1", f"10.72.{x}.2")
    _ip("netns", "add", ns.name)
    try:
        _ip("link", "add", ns.host_link, "type", "veth", "peer", "name", ns.link, "netns",
            ns.name)
        _ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_link)
        _ip("link", "set", ns.host_link, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.ip}/24", "dev", ns.link)
        _ip("-n", ns.name, "link", "set", ns.link, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        ns.kill_all()
        subprocess.run(["ip", "link", "del", ns.host_link], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
