"""Tables for the terminal (rich), with ``--json`` as the machine-readable twin."""

from __future__ import annotations

import time

import msgspec

from ..messages import NodeInfo


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
    return ",".join(parts) if parts else "[red]none[/]"


def print_nodes(nodes: list[NodeInfo], as_json: bool) -> None:
    if as_json:
        print(msgspec.json.encode(nodes).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "STATE", "SESSIONS", "LOAD", "CPU%", "MEM%", "LABELS", "ADDRESS",
                "ISOLATION", "CONTAINERS", "SEEN"):
        table.add_column(col)
    colors = {"ready": "green", "draining": "yellow", "down": "red"}
    for n in nodes:
        table.add_row(
            n.name, f"[{colors[n.state]}]{n.state}[/]", f"{n.sessions}/{n.capacity}",
            f"{n.load.load1:.2f}", f"{n.load.cpu_percent:.0f}", f"{n.load.mem_percent:.0f}",
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
            n.address or "-", _isolation(n), "podman" if n.containers else "-",
            _ago(n.last_seen),
        )
    Console().print(table)
    loose = [f"{n.name} ({n.network})" for n in nodes
             if n.state != "down" and n.network in ("unenforced", "open")]
    if loose:
        Console(stderr=True).print("throwaway users can reach the node's NATS, controller and "
                                   "sessions' ports on: " + ", ".join(loose))
    if not nodes:
        Console(stderr=True).print("no nodes yet: start agents with `shoal agent` or `shoal up`")
