"""``shoal nodes``: the fleet's nodes (a table, a summary or JSON), ``show``, ``drain``,
``undrain``, ``forget``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from .main import main, with_client
from .options import json_option, print_json, prints_record

if TYPE_CHECKING:
    from ..client.sync import SyncClient
    from ..wire.messages import NodeInfo


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
    if ctx.invoked_subcommand is None:
        _list(as_json, summary, all_, (nodeset, state or "", search))


@with_client
def _list(client: SyncClient, as_json: bool, summary: bool, all_: bool,
          wanted: tuple[str, str, str]) -> None:
    from . import tables

    if as_json and not summary:
        tables.write_json_pages(sys.stdout.buffer,
                                (page for page, _ in client.node_pages_raw(*wanted)))
        return
    if summary or not (all_ or any(wanted)):
        fleet = client.fleet()
        if summary:
            tables.print_fleet(fleet, as_json)
            return
        if fleet.nodes > tables.TABLE_MAX:
            attention = []
            for st in ("down", "draining"):  # the first page of each is enough
                pages = client.node_pages(state=st, page=tables.ATTENTION_MAX)
                attention += next(pages, [])
                pages.close()
            tables.print_fleet(fleet, False)
            tables.print_attention(attention, fleet)
            return
    tables.print_nodes(client.nodes(*wanted), False)


@nodes.command("show")
@click.argument("name")
@prints_record(print_json, "The same: the node's record is JSON either way.")
@with_client
def nodes_show(client: SyncClient, name: str) -> NodeInfo:
    """Show one node as JSON."""
    return client.node(name)


@nodes.command("drain")
@click.argument("name")
@click.option("--deadline", type=click.FloatRange(0, 86400),
              help="Seconds until what still runs there is ended (daemons move elsewhere).")
@click.option("--wait", is_flag=True, help="Return only when the node has no sessions left.")
@json_option("The controller's answer as JSON (the sessions left, with --wait).")
@with_client
def nodes_drain(client: SyncClient, name: str, deadline: float | None, wait: bool,
                as_json: bool) -> None:
    """Stop new sessions on a node; optionally end the rest at a deadline."""
    result = client.drain(name, deadline, wait)
    if as_json:
        print_json(result)
        return
    left = result.get("remaining", [])
    click.echo(f"{name}: draining" + (f", {len(left)} session(s) left" if left else ""))


@nodes.command("forget")
@click.argument("names", nargs=-1, required=True)
@with_client
def nodes_forget(client: SyncClient, names: tuple[str, ...]) -> None:
    """Remove nodes that are down (decommissioned machines) from the list."""
    for name in names:
        client.forget(name)


@nodes.command("undrain")
@click.argument("name")
@with_client
def nodes_undrain(client: SyncClient, name: str) -> None:
    """Let a drained node take new sessions again."""
    client.undrain(name)
