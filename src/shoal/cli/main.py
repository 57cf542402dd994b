"""The ``shoal`` command line."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import msgspec

from .. import config as c
from ..errors import ConfigError, ShoalError
from .ssh_opts import ssh_options

if TYPE_CHECKING:
    from ..client.aio import Client

T = TypeVar("T")


def fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"shoal: {message}", err=True)
    sys.exit(status)


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning shoal errors into one clear line and a non-zero exit."""
    import asyncio

    try:
        return asyncio.run(coro)
    except ShoalError as e:
        fail(e.message, 2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


def setup_logging(verbose: bool) -> None:
    import logging  # only the long-running commands log; `shoal run` starts faster without

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def client_messages(raw_terminal: bool = False) -> None:
    """Show the client's own notices (lost the controller, reconnecting...) on stderr as
    ``shoal: ...`` lines; ``raw_terminal`` ends them with CR LF (the terminal is raw)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("shoal: %(message)s"))
    if raw_terminal:
        handler.terminator = "\r\n"
    logger = logging.getLogger("shoal.client.aio")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="SHOAL_URL", help="Controller URL (default: from client.toml).")
@click.option("--token", envvar="SHOAL_TOKEN", help="API token (default: from client.toml).")
@click.version_option(package_name="shoal")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None) -> None:
    """shoal: run commands, daemons and terminals across a fleet of machines."""
    ctx.obj = {"url": url, "token": token}


def client_from(ctx: click.Context) -> Client:
    from ..client.aio import Client

    try:
        return Client.from_config(ctx.obj["url"], ctx.obj["token"])
    except ShoalError as e:
        fail(e.message, 2)


# ---------------------------------------------------------------------- up


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
              help="Every node its own NATS credential (enrolled with a join token) instead "
                   "of one shared agent user; kept for this SHOAL_HOME from then on.")
@click.option("-v", "--verbose", is_flag=True)
def up(agents: int, capacity: int, port: int, services_port: int, host: str, tls: bool,
       tls_names: tuple[str, ...], nats_url: str | None, nats_cluster: int | None,
       leaf_sites: int,
       public_terminals: bool, parking_url: str, node_identities: bool,
       verbose: bool) -> None:
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
                          node_identities=node_identities)))


# ---------------------------------------------------------------------- daemons


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML config (default: $SHOAL_HOME/agent.toml).")
@click.option("--name", help="Node name (default: the hostname).")
@click.option("-l", "--label", "labels", multiple=True, help="key=value label (repeatable).")
@click.option("--capacity", type=click.IntRange(0, 100000), help="Sessions this node takes.")
@click.option("--nats", "nats_url", help="NATS URL.")
@click.option("--nats-user", help="NATS user.")
@click.option("--nats-password", help="NATS password (prefer SHOAL_NATS_PASSWORD).")
@click.option("--nats-creds", type=click.Path(), help="NATS .creds file.")
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
          labels: tuple[str, ...], capacity: int | None, nats_url: str | None,
          nats_user: str | None, nats_password: str | None, nats_creds: str | None,
          address: str | None, virtual: int | None, prefix: str, join_url: str | None,
          join_token: str | None, join_ca: str | None, verbose: bool) -> None:
    """Run an agent: this machine (or N virtual nodes) joins the fleet.

    `shoal agent install HOSTS` puts agents on ssh hosts (`uninstall` removes them)."""
    if ctx.invoked_subcommand is not None:
        return
    from ..agent.host import run_agent, virtual_names

    setup_logging(verbose)
    try:
        flags: dict[str, Any] = {
            "name": name, "capacity": capacity, "address": address,
            "join_url": join_url, "join_token": join_token, "join_ca": join_ca,
            "labels": c.parse_labels(labels) if labels else None,
            "nats": {"url": nats_url, "user": nats_user, "password": nats_password,
                     "creds": nats_creds},
        }
        cfg = c.load(c.AgentConfig, config_path or c.shoal_home() / "agent.toml", flags)
    except ShoalError as e:
        fail(e.message, 2)
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
@click.option("--nats", "nats_url", help="NATS URL.")
@click.option("--nats-user", help="NATS user.")
@click.option("--nats-password", help="NATS password (prefer SHOAL_NATS_PASSWORD).")
@click.option("--nats-creds", type=click.Path(), help="NATS .creds file.")
@click.option("--public-terminals", is_flag=True, default=None,
              help="Let anyone open /terminal (rate-limited); otherwise it needs the token.")
@click.option("--parking-url", default=None, help="Send /terminal visitors here when full.")
@click.option("-v", "--verbose", is_flag=True)
def controller(config_path: Path | None, host: str | None, port: int | None,
               services_port: int | None, nats_url: str | None, nats_user: str | None,
               nats_password: str | None, nats_creds: str | None,
               public_terminals: bool | None, parking_url: str | None, verbose: bool) -> None:
    """Run a controller (HTTP API, web UI, scheduler). Stateless: run as many as you like."""
    from ..controller.server import run_controller

    setup_logging(verbose)
    try:
        flags: dict[str, Any] = {
            "host": host, "port": port, "services_port": services_port,
            "public_terminals": public_terminals,
            "terminal_parking_url": parking_url,
            "nats": {"url": nats_url, "user": nats_user, "password": nats_password,
                     "creds": nats_creds},
        }
        cfg = c.load(c.ControllerConfig, config_path or c.shoal_home() / "controller.toml", flags)
    except ShoalError as e:
        fail(e.message, 2)
    arun(run_controller(cfg))


# ---------------------------------------------------------------------- nodes


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True,
              help="JSON instead of a table (a list of nodes, written a page at a time).")
@click.option("--summary", is_flag=True, help="Only the counts: states, sessions, versions, "
              "labels.")
@click.option("--all", "all_", is_flag=True, help="A table of every node, however many.")
@click.option("-n", "--nodes", "nodeset", default="", help="Only these nodes: web[1-8],db2.")
@click.option("--state", type=click.Choice(["ready", "draining", "down"]), default=None,
              help="Only nodes in this state.")
@click.option("-q", "--search", default="", help="Only nodes with this text in the name, "
              "address, hostname or a key=value label.")
@click.pass_context
def nodes(ctx: click.Context, as_json: bool, summary: bool, all_: bool, nodeset: str,
          state: str | None, search: str) -> None:
    """List the nodes of the fleet, with state and load.

    A fleet of more than 200 nodes is summarised (counts, and the nodes that are not ready)
    unless --all, --json or a filter (-n, --state, -q) asks for the nodes themselves."""
    if ctx.invoked_subcommand is not None:
        return
    from . import tables

    async def go() -> None:
        async with client_from(ctx) as client:
            wanted = (nodeset, state or "", search)
            if as_json and not summary:
                await tables.write_json_pages(
                    sys.stdout.buffer, (page async for page, _ in client.node_pages_raw(*wanted)))
                return
            if summary or not (all_ or any(wanted)):
                fleet = await client.fleet()
                if summary:
                    tables.print_fleet(fleet, as_json)
                    return
                if fleet.nodes > tables.TABLE_MAX:
                    attention = []
                    for st in ("down", "draining"):  # the first page of each is enough
                        async for page in client.node_pages(state=st,
                                                            page=tables.ATTENTION_MAX):
                            attention += page
                            break
                    tables.print_fleet(fleet, False)
                    tables.print_attention(attention, fleet)
                    return
            tables.print_nodes(await client.nodes(*wanted), False)

    arun(go())


@nodes.command("show")
@click.argument("name")
@click.pass_context
def nodes_show(ctx: click.Context, name: str) -> None:
    """Show one node as JSON."""
    from ..wire.messages import to_json

    async def go() -> None:
        async with client_from(ctx) as client:
            click.echo(to_json(await client.node(name)).decode())

    arun(go())


# ---------------------------------------------------------------------- run


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("-a", "--all", "all_", is_flag=True, help="Every node that is up.")
@click.option("-n", "--nodes", "nodeset", default="", help="Node set: node[1-8,12],web3.")
@click.option("-x", "--exclude", default="", help="Node set to leave out.")
@click.option("-g", "--group", "groups", multiple=True,
              help="Node group (@GROUP; from the groups file or labels), repeatable.")
@click.option("-X", "--exclude-group", "xgroups", multiple=True, help="Node group to leave out.")
@click.option("-l", "--label", "labels", multiple=True, help="key=value selector (repeatable).")
@click.option("--batch", default=None, metavar="N|N%",
              help="Roll through the nodes N (or N%) at a time, each slice done before the next.")
@click.option("--fanout", "-f", type=click.IntRange(min=1), default=None,
              help="At most N nodes running at once (like clush -f).")
@click.option("--keep-going", is_flag=True, help="With --batch: roll on after a failed slice.")
@click.option("--shell", "shell", default=None, help="Run this string with /bin/sh -c.")
@click.option("-b", "--gather", is_flag=True, help="Group identical outputs (like clush -b).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
@click.option("--stdin", "use_stdin", is_flag=True, help="Send standard input to every node.")
@click.option("-t", "--tty", "use_tty", is_flag=True, help="Interactive terminal (one node).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="End what still runs after S seconds.")
@click.option("-e", "--env", "env", multiple=True, help="NAME=VALUE for the command.")
@click.option("--cwd", default=None, help="Working directory on the nodes.")
@click.option("-u", "--user", default=None, metavar="NAME",
              help="Run as this user (one the nodes' agents allow: run_as in agent.toml).")
@click.option("--connect-timeout", default=5.0, show_default=True, type=float,
              help="Seconds to wait for each agent to answer.")
@ssh_options
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, all_: bool, nodeset: str, exclude: str, groups: tuple[str, ...],
        xgroups: tuple[str, ...], labels: tuple[str, ...], batch: str | None,
        fanout: int | None, keep_going: bool, shell: str | None, gather: bool, as_json: bool,
        use_stdin: bool, use_tty: bool, timeout: float | None, env: tuple[str, ...],
        cwd: str | None, user: str | None, connect_timeout: float,
        ssh_hosts: tuple[str, ...], inventory_path: Path | None, accept_new: bool,
        known_hosts: Path | None, argv: tuple[str, ...]) -> None:
    """Run a command on many nodes: shoal run --all -- printf '%s\\n' 'a b' c

    -H names hosts without an agent, reached over ssh from this machine (docs/cli.md)."""
    from ..wire import messages as m
    from .run_cmd import raw_terminal, run_command, terminal_size
    from .ssh_opts import choose

    if bool(argv) == bool(shell):
        fail("give a command after -- (argv, passed as is) or --shell 'string', not both", 2)
    if gather and as_json:
        fail("--gather and --json do not combine; pick one", 2)
    try:
        env_map = c.parse_env(env)
        label_map = c.parse_labels(labels)
    except ShoalError as e:
        fail(e.message, 2)
    size, percent = _batch(batch) if batch is not None else (0, 0)
    if keep_going and batch is None:
        fail("--keep-going goes with --batch", 2)
    ssh = choose(nodeset, exclude, ssh_hosts, inventory_path, accept_new, known_hosts)
    if user is not None and ssh.targets:
        fail("--user is for agent nodes; on ssh hosts log in as the user: -H NAME@HOST", 2)
    nodeset = ",".join(x for x in (ssh.nodes, *(_group_ref(g) for g in groups)) if x)
    exclude = ",".join(x for x in (exclude, *(_group_ref(g) for g in xgroups)) if x)
    agents = all_ or bool(nodeset or label_map) or not ssh.targets
    cols, rows = terminal_size()
    try:
        spec = msgspec.convert({"argv": list(argv) or None, "shell": shell, "env": env_map,
                                "cwd": cwd, "tty": use_tty, "cols": cols, "rows": rows,
                                "stdin": use_stdin or use_tty, "timeout": timeout,
                                "user": user}, m.RunSpec)
        targets = msgspec.convert({"all": all_, "nodes": nodeset, "exclude": exclude,
                                   "labels": label_map}, m.Targets)
    except msgspec.ValidationError as e:
        fail(f"bad run request: {e}", 2)
    mode = "raw" if use_tty else "gather" if gather else "json" if as_json else "prefixed"
    progress = (gather or as_json) and sys.stderr.isatty()
    roll: dict[str, Any] = {"batch": size, "batch_percent": percent,
                            "fanout": fanout or 0, "keep_going": keep_going}
    try:
        ssh_leg = None
        if ssh.targets:
            from ..ssh.fanout import command_work

            ssh_leg = ssh.leg(command_work(spec), connect_timeout, **roll)
        cfg = c.load(c.ClientConfig, c.shoal_home() / "client.toml",
                     {"url": ctx.obj["url"], "token": ctx.obj["token"]}) if agents else None
    except ShoalError as e:
        fail(e.message, 2)

    def go() -> int:
        try:
            return run_command(cfg.url if cfg else "", cfg.token if cfg else "",
                               targets if agents else None, spec, mode=mode,
                               progress=progress, connect_timeout=connect_timeout,
                               ssh=ssh_leg, ca=cfg.ca if cfg else "", **roll)
        except ShoalError as e:
            fail(e.message, 2 if isinstance(e, ConfigError) else 1)

    if use_tty:
        if not sys.stdin.isatty():
            fail("--tty needs a terminal on standard input", 2)
        with raw_terminal(sys.stdin.fileno()):
            status = go()
    else:
        status = go()
    sys.exit(status)


def _batch(text: str) -> tuple[int, int]:
    """``--batch 10`` (nodes) or ``--batch 25%`` (of the selection)."""
    digits = text.strip().removesuffix("%")
    if not digits.isdigit() or int(digits) < 1 or (text.strip().endswith("%")
                                                   and int(digits) > 100):
        fail(f"--batch {text!r}: give a number of nodes (10) or a percentage (25%)", 2)
    return (0, int(digits)) if text.strip().endswith("%") else (int(digits), 0)


def _group_ref(name: str) -> str:
    return name if name.startswith("@") else "@" + name


@nodes.command("drain")
@click.argument("name")
@click.option("--deadline", type=click.FloatRange(0, 86400),
              help="Seconds until what still runs there is ended (daemons move elsewhere).")
@click.option("--wait", is_flag=True, help="Return only when the node has no sessions left.")
@click.pass_context
def nodes_drain(ctx: click.Context, name: str, deadline: float | None, wait: bool) -> None:
    """Stop new sessions on a node; optionally end the rest at a deadline."""
    async def go() -> None:
        async with client_from(ctx) as client:
            result = await client.drain(name, deadline, wait)
            left = result.get("remaining", [])
            click.echo(f"{name}: draining" + (f", {len(left)} session(s) left" if left else ""))

    arun(go())


@nodes.command("forget")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def nodes_forget(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove nodes that are down (decommissioned machines) from the list."""
    async def go() -> None:
        async with client_from(ctx) as client:
            for name in names:
                await client.forget(name)

    arun(go())


@nodes.command("undrain")
@click.argument("name")
@click.pass_context
def nodes_undrain(ctx: click.Context, name: str) -> None:
    """Let a drained node take new sessions again."""
    async def go() -> None:
        async with client_from(ctx) as client:
            await client.undrain(name)

    arun(go())


from . import session_cmds  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import service_cmds  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import bridge_cmds  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import admin_cmds  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import nodeset_cmd  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import copy_cmd  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import token_cmds  # noqa: E402, F401, I001  (registers its commands on `main`)
from . import agent_cmds  # noqa: E402, F401, I001  (registers its commands on `agent`)
from . import enroll_cmds  # noqa: E402, F401, I001  (registers `nodes revoke`)
