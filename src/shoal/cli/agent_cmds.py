"""``shoal agent install`` and ``shoal agent uninstall``: agents onto ssh hosts and off again
(src/shoal/ssh/agent_install.py; docs/operations.md, "Installing agents over ssh")."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import config as c
from .daemon_cmds import agent
from .main import checking, fail, with_client
from .options import labels_option
from .ssh_opts import choose, ssh_options

if TYPE_CHECKING:
    from ..client.aio import Client
    from ..ssh.agent_install import InstallOptions, Outcome
    from ..ssh.targets import SshTarget


def _common(f: Any) -> Any:
    for opt in reversed([
        click.argument("targets", nargs=-1, required=True),
        click.option("--prefix", default="/opt/shoal", show_default=True,
                     help="Where on the host: venv, wheels, etc/agent.toml, state, log, run."),
        click.option("--no-systemd", "no_systemd", is_flag=True,
                     help="No systemd unit: start the agent detached (setsid) with a pidfile "
                          "under PREFIX/run (hosts without systemd, tests)."),
        click.option("--python", default="python3", show_default=True,
                     help="The host's Python (same version as this machine's)."),
        click.option("--fanout", "-f", type=click.IntRange(min=1), default=16,
                     show_default=True, help="Hosts worked on at once."),
        click.option("--wait", "wait", type=click.FloatRange(min=1), default=60.0,
                     show_default=True, help="Seconds to wait for each node to be ready "
                                             "(install) or down (uninstall)."),
        click.option("--connect-timeout", default=10.0, show_default=True, type=float,
                     help="Seconds to wait for each ssh connection."),
        ssh_options,
    ]):
        f = opt(f)
    return f


def _targets(targets: tuple[str, ...], ssh_hosts: tuple[str, ...],
             inventory_path: Path | None, accept_new: bool,
             known_hosts: Path | None) -> tuple[list[SshTarget], Any]:
    choice = choose("", "", (*targets, *ssh_hosts), inventory_path, accept_new, known_hosts)
    if not choice.targets:
        fail("name the hosts to work on: shoal agent install 'root@web[1-3]'", 2)
    return choice.targets, choice


def _report(outcome: Outcome) -> None:
    name = outcome.target.name
    if outcome.ok:
        click.echo(f"{name}: {outcome.message}")
    else:
        click.echo(f"shoal: {name}: {outcome.message}", err=True)


def _go(opts: InstallOptions, targets: list[SshTarget], choice: Any, connect_timeout: float,
        fanout: int, uninstall: bool) -> None:
    import sys

    wheels = None
    if not uninstall:
        from ..ssh.wheelhouse import collect

        with checking("wheels"):
            wheels = collect()
    outcomes = _work(opts, targets, choice, connect_timeout, fanout, uninstall, wheels)
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


@with_client
async def _work(client: Client, opts: InstallOptions, targets: list[SshTarget], choice: Any,
                connect_timeout: float, fanout: int, uninstall: bool,
                wheels: Any) -> list[Outcome]:
    """Every host over ssh at once (asyncssh), each asking the controller for its node."""
    from ..ssh import agent_install as ai
    from ..ssh.connect import Connector

    connector = Connector(choice.inventory, connect_timeout,
                          known_hosts=choice.known_hosts, accept_new=choice.accept_new)
    try:
        inst = ai.Installer(opts, connector, client, wheels)
        work = inst.uninstall if uninstall else inst.install
        return await ai.run_all(targets, work, fanout, _report)
    finally:
        connector.close()


@agent.command("install")
@_common
@click.option("--nats", "nats_url", default=None,
              help="NATS URL the hosts reach (default: agent.toml's, if not loopback).")
@labels_option("-l", "--label", "--labels", help="key=value label of the new nodes (repeatable).")
@click.option("--name-from", "name_from", type=click.Choice(["host", "inventory"]),
              default="host", show_default=True,
              help="Node name: the host's hostname, or its name in TARGETS/the inventory.")
def agent_install(targets: tuple[str, ...], prefix: str, no_systemd: bool,
                  python: str, fanout: int, wait: float, connect_timeout: float,
                  ssh_hosts: tuple[str, ...], inventory_path: Path | None, accept_new: bool,
                  known_hosts: Path | None, nats_url: str | None, labels: dict[str, str],
                  name_from: str) -> None:
    """Install this machine's agent on ssh hosts and wait until each node is ready:
    shoal agent install --nats nats://10.0.0.1:4222 'root@web[1-20]'

    Running it again changes nothing (same files, agent running)."""
    from ..ssh import agent_install as ai

    hosts, choice = _targets(targets, ssh_hosts, inventory_path, accept_new, known_hosts)
    with checking("install options"):
        opts = ai.local_options(nats_url, prefix=ai.check_prefix(prefix), labels=labels,
                                name_from=name_from, systemd=not no_systemd, python=python,
                                wait=wait)
    _go(opts, hosts, choice, connect_timeout, fanout, uninstall=False)


@agent.command("uninstall")
@_common
def agent_uninstall(targets: tuple[str, ...], prefix: str,
                    no_systemd: bool, python: str, fanout: int, wait: float,
                    connect_timeout: float, ssh_hosts: tuple[str, ...],
                    inventory_path: Path | None, accept_new: bool,
                    known_hosts: Path | None) -> None:
    """Stop the agent on ssh hosts, delete its unit and PREFIX (venv, config, state), and
    forget its node once the controller calls it down."""
    from ..ssh import agent_install as ai

    hosts, choice = _targets(targets, ssh_hosts, inventory_path, accept_new, known_hosts)
    with checking("install options"):
        opts = ai.InstallOptions(nats=c.NatsConfig(), prefix=ai.check_prefix(prefix),
                                 systemd=not no_systemd, python=python, wait=wait)
    _go(opts, hosts, choice, connect_timeout, fanout, uninstall=True)
