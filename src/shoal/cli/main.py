"""The ``shoal`` command line: the group, its global options, the one map from shoal's errors
to exit statuses, the one way a command gets a client, and ``shoal run`` (the hot path: it
imports neither aiohttp nor asyncio).

Commands are plain functions over the blocking ``SyncClient``:

    @session.command("show")
    @click.argument("sid")
    @with_client
    def show(client: SyncClient, sid: str) -> None:
        print_json(client.session(sid))

and let every ``ShoalError`` rise: ``_Shoal.invoke`` turns it into one ``shoal: ...`` line
and the status of ``EXIT_CODES``. A command that must react to several things at once (an
attached terminal) is an ``async def`` over the async ``Client`` instead, on one event loop
that ``with_client`` starts; the daemons run theirs through ``arun``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from .. import config as c
from ..errors import ConfigError, ShoalError
from .options import env_option, group_refs, json_option, target_options
from .ssh_opts import ssh_options

R = TypeVar("R")
T = TypeVar("T")

# The exit status of a command that ends with a ShoalError: the first class of the error's
# MRO found here (docs/cli.md, "Exit statuses"). `shoal run`, `logs` and `attach` add their
# own for what ran; 130 is Ctrl-C.
EXIT_CODES: dict[type[ShoalError], int] = {
    ConfigError: 2,  # bad flags or configuration, or a request the CLI refused itself
    ShoalError: 1,  # what the controller or the network said: the message says which
}
INTERRUPTED = 130


def exit_code(error: ShoalError) -> int:
    return next(EXIT_CODES[k] for k in type(error).__mro__ if k in EXIT_CODES)


def fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"shoal: {message}", err=True)
    sys.exit(status)


class _Shoal(click.Group):
    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)  # `run` is here
        if found is None:
            _load_commands()
            found = super().get_command(ctx, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # the subcommands, their option callbacks included
        except ShoalError as e:
            fail(e.message, exit_code(e))
        except KeyboardInterrupt:
            sys.exit(INTERRUPTED)


@contextlib.contextmanager
def checking(what: str) -> Iterator[None]:
    """What the CLI checks itself before it asks anyone: any error is the user's (status
    2), whatever the check raises (a ValidationError from the types, msgspec's own)."""
    import msgspec

    try:
        yield
    except msgspec.ValidationError as e:
        raise ConfigError(f"bad {what}: {e}") from e
    except ConfigError:
        raise
    except ShoalError as e:
        raise ConfigError(e.message) from e


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a new event loop: the daemons, and the ``async def`` commands of
    ``with_client``. Errors and Ctrl-C are mapped by ``_Shoal.invoke``."""
    import asyncio

    return asyncio.run(coro)


def with_client(f: Callable[..., Any]) -> Callable[..., Any]:
    """The command gets a client made from ``--url``/``--token``/client.toml as its first
    argument: a ``SyncClient``, or for an ``async def`` the async ``Client`` on a loop of its
    own. The client is closed when the command returns."""
    if inspect.iscoroutinefunction(f):
        @functools.wraps(f)
        def streaming(*args: Any, **kwargs: Any) -> Any:
            return arun(_with_async_client(f, args, kwargs))
        return streaming

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        from ..client.sync import SyncClient

        url, token = _global_options()
        with SyncClient.from_config(url, token) as client:
            return f(client, *args, **kwargs)
    return command


async def _with_async_client(f: Callable[..., Coroutine[Any, Any, R]], args: Any,
                             kwargs: Any) -> R:
    from ..client.aio import Client

    async with Client.from_config(*_global_options()) as client:
        return await f(client, *args, **kwargs)


def _global_options() -> tuple[str | None, str | None]:
    obj = click.get_current_context().obj
    return obj["url"], obj["token"]


def client_config() -> c.ClientConfig:
    """client.toml under the global options, for the commands with a transport of their own
    (``run``, ``copy``: a WebSocket without aiohttp)."""
    url, token = _global_options()
    return c.load(c.ClientConfig, c.shoal_home() / "client.toml", {"url": url, "token": token})


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


@click.group(cls=_Shoal, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="SHOAL_URL", help="Controller URL (default: from client.toml).")
@click.option("--token", envvar="SHOAL_TOKEN", help="API token (default: from client.toml).")
@click.version_option(package_name="shoal")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None) -> None:
    """shoal: run commands, daemons and terminals across a fleet of machines."""
    ctx.obj = {"url": url, "token": token}


# ---------------------------------------------------------------------- run


@main.command(context_settings={"allow_interspersed_args": False})
@target_options
@click.option("--batch", default=None, metavar="N|N%",
              help="Roll through the nodes N (or N%) at a time, each slice done before the next.")
@click.option("--fanout", "-f", type=click.IntRange(min=1), default=None,
              help="At most N nodes running at once (like clush -f).")
@click.option("--keep-going", is_flag=True, help="With --batch: roll on after a failed slice.")
@click.option("--shell", "shell", default=None, help="Run this string with /bin/sh -c.")
@click.option("-b", "--gather", is_flag=True, help="Group identical outputs (like clush -b).")
@json_option("One JSON object per node.")
@click.option("--stdin", "use_stdin", is_flag=True, help="Send standard input to every node.")
@click.option("-t", "--tty", "use_tty", is_flag=True, help="Interactive terminal (one node).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="End what still runs after S seconds.")
@env_option("NAME=VALUE for the command.")
@click.option("--cwd", default=None, help="Working directory on the nodes.")
@click.option("-u", "--user", default=None, metavar="NAME",
              help="Run as this user (one the nodes' agents allow: run_as in agent.toml).")
@click.option("--connect-timeout", default=5.0, show_default=True, type=float,
              help="Seconds to wait for each agent to answer.")
@ssh_options
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def run(all_: bool, nodeset: str, exclude: str, groups: tuple[str, ...],
        xgroups: tuple[str, ...], labels: dict[str, str], batch: str | None,
        fanout: int | None, keep_going: bool, shell: str | None, gather: bool, as_json: bool,
        use_stdin: bool, use_tty: bool, timeout: float | None, env: dict[str, str],
        cwd: str | None, user: str | None, connect_timeout: float,
        ssh_hosts: tuple[str, ...], inventory_path: Path | None, accept_new: bool,
        known_hosts: Path | None, argv: tuple[str, ...]) -> None:
    """Run a command on many nodes: shoal run --all -- printf '%s\\n' 'a b' c

    -H names hosts without an agent, reached over ssh from this machine (docs/cli.md)."""
    import msgspec

    from ..wire import messages as m
    from .run_cmd import raw_terminal, run_command, terminal_size
    from .ssh_opts import choose

    if bool(argv) == bool(shell):
        fail("give a command after -- (argv, passed as is) or --shell 'string', not both", 2)
    if gather and as_json:
        fail("--gather and --json do not combine; pick one", 2)
    size, percent = _batch(batch) if batch is not None else (0, 0)
    if keep_going and batch is None:
        fail("--keep-going goes with --batch", 2)
    ssh = choose(nodeset, exclude, ssh_hosts, inventory_path, accept_new, known_hosts)
    if user is not None and ssh.targets:
        fail("--user is for agent nodes; on ssh hosts log in as the user: -H NAME@HOST", 2)
    nodeset = group_refs(ssh.nodes, groups)
    agents = all_ or bool(nodeset or labels) or not ssh.targets
    cols, rows = terminal_size()
    with checking("run request"):
        spec = msgspec.convert({"argv": list(argv) or None, "shell": shell, "env": env,
                                "cwd": cwd, "tty": use_tty, "cols": cols, "rows": rows,
                                "stdin": use_stdin or use_tty, "timeout": timeout,
                                "user": user}, m.RunSpec)
        targets = msgspec.convert({"all": all_, "nodes": nodeset,
                                   "exclude": group_refs(exclude, xgroups),
                                   "labels": labels}, m.Targets)
    mode = "raw" if use_tty else "gather" if gather else "json" if as_json else "prefixed"
    progress = (gather or as_json) and sys.stderr.isatty()
    roll: dict[str, Any] = {"batch": size, "batch_percent": percent,
                            "fanout": fanout or 0, "keep_going": keep_going}
    ssh_leg = None
    if ssh.targets:
        from ..ssh.fanout import command_work

        with checking("ssh hosts"):
            ssh_leg = ssh.leg(command_work(spec), connect_timeout, **roll)
    cfg = client_config() if agents else None

    def go() -> int:
        return run_command(cfg.url if cfg else "", cfg.token if cfg else "",
                           targets if agents else None, spec, mode=mode,
                           progress=progress, connect_timeout=connect_timeout,
                           ssh=ssh_leg, ca=cfg.ca if cfg else "", **roll)

    if use_tty:
        if not sys.stdin.isatty():
            fail("--tty needs a terminal on standard input", 2)
        with raw_terminal(sys.stdin.fileno()):
            status = go()
    else:
        status = go()
    _exit_now(status)


def _exit_now(status: int) -> NoReturn:
    """End ``shoal run`` once what it printed is flushed, without the interpreter's
    teardown: freeing every module and object one by one costs 11 ms of a 100 ms command,
    and the kernel frees it all at once. Nothing of run's needs an exit handler (its
    WebSocket is closed, its terminal restored, by then)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (| head): it had what it wanted
        pass
    sys.stderr.flush()
    os._exit(status)


def _batch(text: str) -> tuple[int, int]:
    """``--batch 10`` (nodes) or ``--batch 25%`` (of the selection)."""
    digits = text.strip().removesuffix("%")
    if not digits.isdigit() or int(digits) < 1 or (text.strip().endswith("%")
                                                   and int(digits) > 100):
        fail(f"--batch {text!r}: give a number of nodes (10) or a percentage (25%)", 2)
    return (0, int(digits)) if text.strip().endswith("%") else (int(digits), 0)


def _load_commands() -> None:
    """Import the modules of every command but ``run`` (each registers its own on ``main``
    as it loads): done by ``_Shoal`` for any other command and for help, so that ``shoal
    run``, the latency that matters most, loads none of them."""
    from . import (  # noqa: F401 - imported for what they register
        admin_cmds,
        agent_cmds,  # on `agent`, of daemon_cmds
        bridge_cmds,
        copy_cmd,
        daemon_cmds,
        enroll_cmds,  # `nodes revoke`, `admin node-identities`
        node_cmds,
        nodeset_cmd,
        service_cmds,
        session_cmds,
        token_cmds,
    )
