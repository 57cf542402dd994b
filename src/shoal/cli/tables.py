"""Tables for the terminal (rich), with ``--json`` as the machine-readable twin."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import msgspec

from ..wire.messages import FleetSummary, NodeInfo


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    d = max(0.0, time.time() - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    return f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.0f}h ago"


def _isolation(n: NodeInfo) -> str:
    """Throwaway users and cgroups, or a warning that sessions are not contained."""
    parts = (["users"] if n.isolation else []) + (["cgroups"] if n.cgroups else [])
    return ",".join(parts) if parts else "none"


TABLE_MAX = 200  # more nodes than this: a summary by default, and plain text for --all
ATTENTION_MAX = 50  # down or draining nodes named under a summary
NODE_COLUMNS = ("NAME", "STATE", "SESSIONS", "LOAD", "CPU%", "MEM%", "LABELS", "ADDRESS",
                "ISOLATION", "CONTAINERS", "SEEN")


def _node_row(n: NodeInfo) -> tuple[str, ...]:
    return (n.name, n.state, f"{n.sessions}/{n.capacity}", f"{n.load.load1:.2f}",
            f"{n.load.cpu_percent:.0f}", f"{n.load.mem_percent:.0f}",
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
            n.address or "-", _isolation(n), "podman" if n.containers else "-",
            _ago(n.last_seen))


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table for people (rich markup allowed in cells)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def print_nodes(nodes: list[NodeInfo], as_json: bool) -> None:
    if as_json:
        print(msgspec.json.encode(nodes).decode())
        return
    from rich.console import Console

    if len(nodes) > TABLE_MAX:
        _print_plain(nodes)  # rich takes seconds per thousand rows
    else:
        print_table(NODE_COLUMNS, (_colored(_node_row(n)) for n in nodes))
    loose = [f"{n.name} ({n.network})" for n in nodes
             if n.state != "down" and n.network in ("unenforced", "open")]
    if loose:
        Console(stderr=True).print("throwaway users can reach the node's NATS, controller and "
                                   "sessions' ports on: " + ", ".join(loose))
    if not nodes:
        Console(stderr=True).print("no nodes yet: start agents with `shoal agent` or `shoal up`")


def _colored(row: tuple[str, ...]) -> tuple[str, ...]:
    state = f"[{_COLORS[row[1]]}]{row[1]}[/]"
    isolation = "[red]none[/]" if row[8] == "none" else row[8]
    return (row[0], state, *row[2:8], isolation, *row[9:])


_COLORS = {"ready": "green", "draining": "yellow", "down": "red"}


def _print_plain(nodes: list[NodeInfo]) -> None:
    rows = [NODE_COLUMNS, *(_node_row(n) for n in nodes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(NODE_COLUMNS))]
    out = sys.stdout
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def write_json_pages(out: BinaryIO, pages: Iterable[bytes]) -> None:
    """Write JSON arrays as they come as one array, without decoding them."""
    out.write(b"[")
    first = True
    for page in pages:
        body = page.strip()[1:-1].strip()
        if not body:
            continue
        if not first:
            out.write(b",")
        out.write(body)
        out.flush()
        first = False
    out.write(b"]\n")
    out.flush()


def print_fleet(fleet: FleetSummary, as_json: bool) -> None:
    # Plain print, no rich: this is what `shoal nodes` shows on a big fleet, and importing
    # rich costs a tenth of a second of the command's time.
    if as_json:
        print(msgspec.json.encode(fleet).decode())
        return
    st = fleet.states
    lines = [
        f"{fleet.nodes:,} nodes: {st.get('ready', 0):,} ready, {st.get('draining', 0):,} "
        f"draining, {st.get('down', 0):,} down  ({fleet.agents:,} agent processes on "
        f"{fleet.hosts:,} hosts)",
        f"sessions: {fleet.sessions:,} of {fleet.capacity:,} capacity",
        "versions: " + ", ".join(f"{v} ({c:,})" for v, c in fleet.versions.items()),
        "network policy: " + (", ".join(f"{k} ({c:,})" for k, c in fleet.network.items())
                              or "-"),
    ]
    for key, values in fleet.labels.items():
        lines.append(f"label {key}: " + ", ".join(f"{v} ({c:,})" for v, c in values.items()))
    print("\n".join(lines))


def print_attention(nodes: list[NodeInfo], fleet: FleetSummary) -> None:
    if nodes:
        print()
        print_nodes(nodes, False)
    not_ready = fleet.nodes - fleet.states.get("ready", 0)
    more = f" ({not_ready - len(nodes):,} more not ready)" if not_ready > len(nodes) else ""
    print(f"{fleet.nodes:,} nodes: the table is left out{more}; list them with -n NODESET, "
          "--state, -q TEXT, --all or --json", file=sys.stderr)
