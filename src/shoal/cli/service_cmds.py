"""``shoal service ...`` and ``shoal best``: replicas behind one name."""

from __future__ import annotations

import sys
from typing import Any

import click
import msgspec

from ..config import parse_env, parse_labels
from ..errors import ShoalError
from ..wire import messages as m
from ..wire import servicetypes as st
from .main import arun, client_from, fail, main


def _print_services(views: list[st.ServiceView], as_json: bool) -> None:
    if as_json:
        click.echo(m.to_json(views).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "REPLICAS", "UP", "CHECK", "MODE", "URL"):
        table.add_column(col)
    for v in views:
        live = len(v.replicas)
        table.add_row(v.name, "stopped" if v.stopped else f"{live}/{v.spec.replicas}",
                      str(v.up), v.spec.check, "proxy" if v.spec.proxy else "redirect", v.url)
    Console().print(table)


def _print_replicas(v: st.ServiceView) -> None:
    from rich.console import Console
    from rich.table import Table

    click.echo(f"{v.name}: {v.up} of {v.spec.replicas} up, check {v.spec.check} every "
               f"{v.spec.interval:g}s (rise {v.spec.rise}, fall {v.spec.fall}), "
               f"{'proxy' if v.spec.proxy else 'redirect'} at {v.url}"
               + (" [stopped]" if v.stopped else ""))
    table = Table(box=None, header_style="bold")
    for col in ("REPLICA", "NODE", "ADDRESS", "STATE", "HEALTH", "EWMA MS", "IN FLIGHT",
                "CHOSEN", "LAST ERROR"):
        table.add_column(col)
    for r in v.replicas:
        table.add_row(r.id, r.node or "-", f"{r.host}:{r.port}" if r.port else "-", r.state,
                      r.health + (" (draining)" if r.draining else ""),
                      f"{r.ewma_ms:.2f}" if r.ewma_ms is not None else "-", str(r.inflight),
                      str(r.chosen), r.last_error)
    Console().print(table)


@main.group()
def service() -> None:
    """Services: replicas behind one name, probed and balanced (create, list, show, ...)."""


@service.command("create")
@click.argument("name")
@click.option("-r", "--replicas", type=click.IntRange(0, 1000), default=1, show_default=True)
@click.option("--check", default="tcp", show_default=True,
              help="Health check: tcp (connect to $PORT) or http:/path (GET, 2xx/3xx passes).")
@click.option("--interval", type=float, default=2.0, show_default=True,
              help="Seconds between checks.")
@click.option("--check-timeout", type=float, default=1.0, show_default=True,
              help="A check with no answer after S seconds fails.")
@click.option("--rise", type=click.IntRange(1, 100), default=2, show_default=True,
              help="Passed checks in a row to come back into rotation.")
@click.option("--fall", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Failed checks in a row to leave the rotation.")
@click.option("--proxy", is_flag=True,
              help="The controller forwards /s/NAME/ traffic (else: 307 redirects).")
@click.option("--drain-deadline", type=float, default=30.0, show_default=True,
              help="Seconds a draining replica may finish its requests.")
@click.option("--shell", default=None, help="Run this string with /bin/sh -c.")
@click.option("-e", "--env", multiple=True, help="NAME=VALUE (repeatable).")
@click.option("--cwd", default=None)
@click.option("-s", "--selector", multiple=True, help="Only nodes with this key=value label.")
@click.option("-l", "--label", "labels", multiple=True, help="key=value on each replica.")
@click.option("--json", "as_json", is_flag=True)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def create(ctx: click.Context, name: str, replicas: int, check: str, interval: float,
           check_timeout: float, rise: int, fall: int, proxy: bool, drain_deadline: float,
           shell: str | None, env: tuple[str, ...], cwd: str | None, selector: tuple[str, ...],
           labels: tuple[str, ...], as_json: bool, argv: tuple[str, ...]) -> None:
    """Create a service: shoal service create web --replicas 3 -- python3 -m http.server

    Options go before `--`, the command after it. Each replica gets its port in $PORT and
    must listen on it."""
    if bool(argv) == bool(shell):
        fail("give a command after -- (argv) or --shell 'string', not both", 2)
    try:
        st.check_name(name)
        st.parse_check(check)
        body: dict[str, Any] = {
            "name": name, "command": list(argv) or None, "shell": shell, "replicas": replicas,
            "check": check, "interval": interval, "timeout": check_timeout, "rise": rise,
            "fall": fall, "proxy": proxy, "drain_deadline": drain_deadline,
            "env": parse_env(env), "cwd": cwd,
            "selector": parse_labels(selector), "labels": parse_labels(labels),
        }
        spec = msgspec.convert(body, st.ServiceSpec)
        st.validate(spec)
    except msgspec.ValidationError as e:
        fail(f"bad service spec: {e}", 2)
    except ShoalError as e:
        fail(e.message, 2)

    async def go() -> st.ServiceView:
        async with client_from(ctx) as c:
            return await c.create_service(spec)

    view = arun(go())
    click.echo(m.to_json(view).decode() if as_json else view.url)


@service.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List services."""
    async def go() -> list[st.ServiceView]:
        async with client_from(ctx) as c:
            return await c.services()

    _print_services(arun(go()), as_json)


@service.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show a service and the health, latency and load of each replica."""
    async def go() -> st.ServiceView:
        async with client_from(ctx) as c:
            return await c.service(name)

    view = arun(go())
    if as_json:
        click.echo(m.to_json(view).decode())
    else:
        _print_replicas(view)


@service.command("scale")
@click.argument("name")
@click.argument("replicas", type=click.IntRange(0, 1000))
@click.pass_context
def scale(ctx: click.Context, name: str, replicas: int) -> None:
    """Set the number of replicas (extra ones are drained first)."""
    async def go() -> None:
        async with client_from(ctx) as c:
            await c.scale_service(name, replicas)

    arun(go())


@service.command("drain")
@click.argument("name")
@click.option("--replica", default=None, help="Only this replica (it is replaced).")
@click.option("--deadline", type=click.FloatRange(0, 86400),
              help="Seconds in-flight requests may take (default: the service's).")
@click.option("--wait", is_flag=True, help="Return when the drained replicas have ended.")
@click.pass_context
def drain(ctx: click.Context, name: str, replica: str | None, deadline: float | None,
          wait: bool) -> None:
    """Stop new clients at once; let requests in flight finish; then end the replicas."""
    async def go() -> None:
        async with client_from(ctx) as c:
            await c.drain_service(name, replica, deadline, wait)

    arun(go())


@service.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--deadline", type=click.FloatRange(0, 86400),
              help="Seconds in-flight requests may take (default: the service's).")
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...], deadline: float | None) -> None:
    """Remove services: drain them, end their replicas, forget them."""
    async def go() -> None:
        async with client_from(ctx) as c:
            for name in names:
                await c.remove_service(name, deadline)

    arun(go())


@main.command("best")
@click.argument("name")
@click.option("--url", "as_url", is_flag=True, help="Print the URL instead of host:port.")
@click.pass_context
def best(ctx: click.Context, name: str, as_url: bool) -> None:
    """Print host:port of the best replica of a service now (for scripts)."""
    async def go() -> st.Best:
        async with client_from(ctx) as c:
            return await c.best(name)

    b = arun(go())
    host = f"[{b.host}]" if ":" in b.host else b.host
    click.echo(b.url if as_url else f"{host}:{b.port}")
    sys.stdout.flush()
