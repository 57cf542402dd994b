"""The ssh options that ``run``, ``copy`` and ``rcopy`` share, and how they split a
command's targets between agent nodes (the controller) and ssh hosts (this process)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import config as c
from ..errors import ShoalError

if TYPE_CHECKING:
    from ..ssh.fanout import SshLeg, Work
    from ..ssh.targets import Inventory, SshTarget


def ssh_options(f: Any) -> Any:
    for opt in reversed([
        click.option("-H", "--hosts", "ssh_hosts", multiple=True,
                     help="ssh hosts, [user@]host[:port] node sets: 'root@web[1-20].example' "
                          "(repeatable; inventory names too)."),
        click.option("--inventory", "inventory_path", type=click.Path(path_type=Path),
                     envvar="SHOAL_INVENTORY",
                     help="ssh inventory (default: $SHOAL_HOME/inventory.toml); -n names "
                          "found there are reached over ssh."),
        click.option("--accept-new-host-keys", "accept_new", is_flag=True,
                     help="Accept and record the host key of an ssh host seen for the first "
                          "time (a changed key is still refused)."),
        click.option("--known-hosts", "known_hosts", type=click.Path(path_type=Path),
                     help="known_hosts file (default: ~/.ssh/config's, else "
                          "~/.ssh/known_hosts)."),
    ]):
        f = opt(f)
    return f


@dataclass
class SshChoice:
    """The ssh side of a command's targets: ``nodes`` is what is left for the controller."""

    nodes: str
    targets: list[SshTarget]
    inventory: Inventory
    accept_new: bool
    known_hosts: Path | None

    def leg(self, work: Work, connect_timeout: float, **roll: Any) -> SshLeg | None:
        if not self.targets:
            return None
        from ..ssh.fanout import SshLeg

        return SshLeg(self.targets, work, inventory=self.inventory,
                      connect_timeout=connect_timeout, known_hosts=self.known_hosts,
                      accept_new=self.accept_new, **roll)


def choose(nodes: str, exclude: str, ssh_hosts: tuple[str, ...], inventory_path: Path | None,
           accept_new: bool, known_hosts: Path | None) -> SshChoice:
    """Split ``-n`` by the inventory and add ``-H``; bad input ends the command (status 2)."""
    from ..ssh import targets as st
    from .main import fail  # main imports this module for ssh_options

    path = inventory_path or c.shoal_home() / "inventory.toml"
    try:
        inventory = st.load_inventory(path, required=inventory_path is not None)
        rest, found = st.split_nodes(nodes, inventory)
        for spec in ssh_hosts:
            found.extend(st.parse_hosts(spec, inventory))
    except ShoalError as e:
        fail(e.message, 2)
    seen: dict[str, st.SshTarget] = {}
    for t in st.exclude(found, exclude):
        seen.setdefault(t.name, t)
    if known_hosts is not None and not os.access(known_hosts.parent, os.W_OK | os.X_OK):
        fail(f"--known-hosts {known_hosts}: its directory is not writable", 2)
    return SshChoice(rest, list(seen.values()), inventory, accept_new, known_hosts)
