"""``shoal service ...`` and ``shoal best``: replicas behind one name."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click
import msgspec

from ..wire import servicetypes as st
from .main import checking, fail, main, with_client
from .options import (
    container_options,
    env_option,
    json_option,
    labels_option,
    print_json,
    prints_record,
)
from .tables import print_table

if TYPE_CHECKING:
    from ..client.sync import SyncClient

SERVICE_COLUMNS = ("NAME", "REPLICAS", "UP", "CHECK", "MODE", "URL")
REPLICA_COLUMNS = ("REPLICA", "NODE", "ADDRESS", "STATE", "HEALTH", "EWMA MS", "IN FLIGHT",
                   "CHOSEN", "LAST ERROR")


def _service_row(v: st.ServiceView) -> tuple[str, ...]:
    return (v.name, "stopped" if v.stopped else f"{len(v.replicas)}/{v.spec.replicas}",
            str(v.up), v.spec.check, "proxy" if v.spec.proxy else "redirect", v.url)


def _replica_row(r: st.ReplicaView) -> tuple[str, ...]:
    return (r.id, r.node or "-", f"{r.host}:{r.port}" if r.port else "-", r.state,
            r.health + (" (draining)" if r.draining else ""),
            f"{r.ewma_ms:.2f}" if r.ewma_ms is not None else "-", str(r.inflight),
            str(r.chosen), r.last_error)


def _print_replicas(v: st.ServiceView) -> None:
    click.echo(f"{v.name}: {v.up} of {v.spec.replicas} up, check {v.spec.check} every "
               f"{v.spec.interval:g}s (rise {v.spec.rise}, fall {v.spec.fall}), "
               f"{'proxy' if v.spec.proxy else 'redirect'} at {v.url}"
               + (" [stopped]" if v.stopped else ""))
    print_table(REPLICA_COLUMNS, map(_replica_row, v.replicas))


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
@env_option()
@click.option("--cwd", default=None)
@labels_option("-s", "--selector", dest="selector",
               help="Only nodes with this key=value label (repeatable).")
@labels_option("-l", "--label", help="key=value on each replica (repeatable).")
@container_options
@prints_record(lambda view: click.echo(view.url), "The service as JSON instead of its URL.")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@with_client
def create(client: SyncClient, name: str, replicas: int, check: str, interval: float,
           check_timeout: float, rise: int, fall: int, proxy: bool, drain_deadline: float,
           shell: str | None, env: dict[str, str], cwd: str | None, selector: dict[str, str],
           labels: dict[str, str], container: dict[str, Any],
           argv: tuple[str, ...]) -> st.ServiceView:
    """Create a service: shoal service create web --replicas 3 -- python3 -m http.server

    Options go before `--`, the command after it. Each replica gets its port in $PORT and
    must listen on it; with --image, the first --container-port is published on it."""
    if argv and shell or not (argv or shell or container):
        fail("give a command after -- (argv) or --shell 'string', not both", 2)
    with checking("service spec"):
        st.check_name(name)
        st.parse_check(check)
        spec = msgspec.convert({
            "name": name, "command": list(argv) or None, "shell": shell, "replicas": replicas,
            "check": check, "interval": interval, "timeout": check_timeout, "rise": rise,
            "fall": fall, "proxy": proxy, "drain_deadline": drain_deadline,
            "env": env, "cwd": cwd, "selector": selector, "labels": labels, **container,
        }, st.ServiceSpec)
        st.validate(spec)
    return client.create_service(spec)


@service.command("list")
@prints_record(lambda views: print_table(SERVICE_COLUMNS, map(_service_row, views)),
               "The services as a JSON list.")
@with_client
def list_(client: SyncClient) -> list[st.ServiceView]:
    """List services."""
    return client.services()


@service.command("show")
@click.argument("name")
@prints_record(_print_replicas, "The service and its replicas as JSON.")
@with_client
def show(client: SyncClient, name: str) -> st.ServiceView:
    """Show a service and the health, latency and load of each replica."""
    return client.service(name)


@service.command("scale")
@click.argument("name")
@click.argument("replicas", type=click.IntRange(0, 1000))
@prints_record(help="The service as JSON.")
@with_client
def scale(client: SyncClient, name: str, replicas: int) -> st.ServiceView:
    """Set the number of replicas (extra ones are drained first)."""
    return client.scale_service(name, replicas)


@service.command("drain")
@click.argument("name")
@click.option("--replica", default=None, help="Only this replica (it is replaced).")
@click.option("--deadline", type=click.FloatRange(0, 86400),
              help="Seconds in-flight requests may take (default: the service's).")
@click.option("--wait", is_flag=True, help="Return when the drained replicas have ended.")
@prints_record(help="The service as JSON.")
@with_client
def drain(client: SyncClient, name: str, replica: str | None, deadline: float | None,
          wait: bool) -> st.ServiceView:
    """Stop new clients at once; let requests in flight finish; then end the replicas."""
    return client.drain_service(name, replica, deadline, wait)


@service.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--deadline", type=click.FloatRange(0, 86400),
              help="Seconds in-flight requests may take (default: the service's).")
@with_client
def rm(client: SyncClient, names: tuple[str, ...], deadline: float | None) -> None:
    """Remove services: drain them, end their replicas, forget them."""
    for name in names:
        client.remove_service(name, deadline)


@main.command("best")
@click.argument("name")
@click.option("--url", "as_url", is_flag=True, help="Print the URL instead of host:port.")
@json_option("The chosen replica as JSON (host, port, url, ...).")
@with_client
def best(client: SyncClient, name: str, as_url: bool, as_json: bool) -> None:
    """Print host:port of the best replica of a service now (for scripts)."""
    b = client.best(name)
    if as_json:
        print_json(b)
        return
    host = f"[{b.host}]" if ":" in b.host else b.host
    click.echo(b.url if as_url else f"{host}:{b.port}")
    sys.stdout.flush()
