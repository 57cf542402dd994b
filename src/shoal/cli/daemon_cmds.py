"""``shoal up``, ``shoal agent`` and ``shoal controller``: the long-running parts of a fleet,
each on an event loop of its own until a signal ends it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from .. import config as c
from .main import arun, fail, main, setup_logging
from .options import labels_option

R = TypeVar("R")

def _nats_options(f: Callable[..., R]) -> Callable[..., R]:
    """``--nats``, ``--nats-user``, ``--nats-password``, ``--nats-creds``: the command gets
    them as ``nats``, the flags of the config's ``[nats]`` table."""
    @functools.wraps(f)
    def command(*args: Any, nats_url: str | None, nats_user: str | None,
                nats_password: str | None, nats_creds: str | None, **kwargs: Any) -> R:
        return f(*args, nats={"url": nats_url, "user": nats_user, "password": nats_password,
                              "creds": nats_creds}, **kwargs)
    for opt in reversed([
        click.option("--nats", "nats_url", help="NATS URL."),
        click.option("--nats-user", help="NATS user."),
        click.option("--nats-password", help="NATS password (prefer SHOAL_NATS_PASSWORD)."),
        click.option("--nats-creds", type=click.Path(), help="NATS .creds file."),
    ]):
        command = opt(command)
    return command


@main.command()
@click.option("--agents", default=2, show_default=True, type=click.IntRange(0, 10000),
              help="Local agents to start (node-1, node-2, ...).")
@click.option("--capacity", default=16, show_default=True, type=click.IntRange(0, 100000),
              help="Sessions each agent takes.")
@click.option("--port", default=c.DEFAULT_HTTP_PORT, show_default=True,
              type=click.IntRange(0, 65535), help="HTTP port of the controller (0: any free).")
@click.option("--services-port", default=c.SERVICES_PORT_NEXT, type=click.IntRange(-1, 65535),
              help="Port of the services listener, /s/NAME/ (default: --port + 1; 0: any "
                   "free).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="HTTP address to bind. Beyond loopback, use --tls or put TLS in front "
                   "(docs/operations.md).")
@click.option("--tls", is_flag=True,
              help="Make a CA and certificates ($SHOAL_HOME/tls/): NATS with mutual TLS, the "
                   "controller on HTTPS, client.toml trusting the CA.")
@click.option("--tls-name", "tls_names", multiple=True,
              help="Another DNS name or IP address for the server certificate (repeatable; "
                   "127.0.0.1, ::1, localhost and --host are always in it).")
@click.option("--nats", "nats_url", default=None, help="Use this NATS instead of an embedded one.")
@click.option("--nats-cluster", "nats_cluster", type=click.IntRange(2, 9), default=None,
              help="Start a local NATS cluster of N servers, a controller on each, and "
                   "spread the agents over them.")
@click.option("--leaf-sites", "leaf_sites", type=click.IntRange(0, 9), default=0,
              help="Also start N sites, each a nats-server in leaf mode dialling the "
                   "embedded one, with one agent (site-K-node-1).")
@click.option("--public-terminals", is_flag=True,
              help="Let anyone open /terminal (rate-limited); otherwise it needs the token.")
@click.option("--parking-url", default="", help="Send /terminal visitors here when full.")
@click.option("--node-identities", is_flag=True,
              help="Move a SHOAL_HOME made with the shared agent user to node identities "
                   "(the default for a new one: every node its own NATS credential, "
                   "enrolled with a join token); kept from then on.")
@click.option("--shared-agent-user", is_flag=True,
              help="A new SHOAL_HOME keeps one shared NATS agent user instead of node "
                   "identities: for virtual fleets of more than 64 nodes per agent process.")
@click.option("-v", "--verbose", is_flag=True)
def up(agents: int, capacity: int, port: int, services_port: int, host: str, tls: bool,
       tls_names: tuple[str, ...], nats_url: str | None, nats_cluster: int | None,
       leaf_sites: int, public_terminals: bool, parking_url: str, node_identities: bool,
       shared_agent_user: bool, verbose: bool) -> None:
    """Start a local fleet: embedded NATS, a controller and local agents."""
    from ..up import UpOptions, run_up

    setup_logging(verbose)
    if nats_cluster and nats_url:
        fail("--nats-cluster starts its own servers: drop --nats, or drop --nats-cluster to "
             "use the NATS at --nats", 2)
    arun(run_up(UpOptions(agents=agents, capacity=capacity, port=port,
                          services_port=services_port, host=host,
                          nats_url=nats_url, public_terminals=public_terminals,
                          parking_url=parking_url, nats_cluster=nats_cluster or 0,
                          leaf_sites=leaf_sites, tls=tls, tls_names=tls_names,
                          node_identities=node_identities,
                          shared_agent_user=shared_agent_user)))


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML config (default: $SHOAL_HOME/agent.toml).")
@click.option("--name", help="Node name (default: the hostname).")
@labels_option("-l", "--label", help="key=value label (repeatable).")
@click.option("--capacity", type=click.IntRange(0, 100000), help="Sessions this node takes.")
@_nats_options
@click.option("--address", help="Address clients use to reach this node's ports.")
@click.option("--virtual", type=click.IntRange(1, 100000), default=None,
              help="Run N logical nodes in this process (PREFIX1..PREFIXN).")
@click.option("--prefix", default="vnode-", show_default=True, help="Name prefix for --virtual.")
@click.option("--join", "join_url", help="Enroll at this controller URL (once; the credential "
              "is kept in the state directory).")
@click.option("--token", "join_token", help="The join token (shoal token create --join).")
@click.option("--join-ca", help="CA file to verify an https:// --join controller by.")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def agent(ctx: click.Context, config_path: Path | None, name: str | None,
          labels: dict[str, str], capacity: int | None, nats: dict[str, str | None],
          address: str | None, virtual: int | None, prefix: str, join_url: str | None,
          join_token: str | None, join_ca: str | None, verbose: bool) -> None:
    """Run an agent: this machine (or N virtual nodes) joins the fleet.

    `shoal agent install HOSTS` puts agents on ssh hosts (`uninstall` removes them)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..agent.host import run_agent, virtual_names

    setup_logging(verbose)
    flags: dict[str, Any] = {
        "name": name, "capacity": capacity, "address": address,
        "join_url": join_url, "join_token": join_token, "join_ca": join_ca,
        "labels": labels or None,  # none given: the file's
        "nats": nats,
    }
    cfg = c.load(c.AgentConfig, config_path or c.shoal_home() / "agent.toml", flags)
    names = virtual_names(prefix, virtual) if virtual else [cfg.name or c.default_node_name()]
    _check_names(names)
    arun(run_agent(cfg, names))


def _check_names(names: list[str]) -> None:
    from ..wire.messages import NodeName

    for n in names:
        try:
            msgspec.convert(n, NodeName)
        except msgspec.ValidationError:
            fail(f"bad node name {n!r}: use letters, digits, '_' and '-' (at most 63)", 2)


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML config (default: $SHOAL_HOME/controller.toml).")
@click.option("--host", help="HTTP address to bind (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="HTTP port.")
@click.option("--services-port", type=click.IntRange(0, 65535),
              help="Port of the services listener, /s/NAME/ (default: --port + 1; 0: any "
                   "free).")
@_nats_options
@click.option("--public-terminals", is_flag=True, default=None,
              help="Let anyone open /terminal (rate-limited); otherwise it needs the token.")
@click.option("--parking-url", default=None, help="Send /terminal visitors here when full.")
@click.option("-v", "--verbose", is_flag=True)
def controller(config_path: Path | None, host: str | None, port: int | None,
               services_port: int | None, nats: dict[str, str | None],
               public_terminals: bool | None, parking_url: str | None, verbose: bool) -> None:
    """Run a controller (HTTP API, web UI, scheduler). Stateless: run as many as you like."""
    from ..controller.server import run_controller

    setup_logging(verbose)
    flags: dict[str, Any] = {
        "host": host, "port": port, "services_port": services_port,
        "public_terminals": public_terminals,
        "terminal_parking_url": parking_url,
        "nats": nats,
    }
    cfg = c.load(c.ControllerConfig, config_path or c.shoal_home() / "controller.toml", flags)
    arun(run_controller(cfg))


