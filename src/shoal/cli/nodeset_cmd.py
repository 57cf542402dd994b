"""``shoal nodeset``: fold, expand and count node sets, list groups (ClusterShell's
``nodeset``). Works offline: groups come from a groups file, not from the fleet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .main import fail, main

DEFAULT_GROUPS = "/etc/clustershell/groups.conf"


@main.command("nodeset")
@click.option("-f", "--fold", "action", flag_value="fold", default=True,
              help="Print the set folded (the default): node[1-3].")
@click.option("-e", "--expand", "action", flag_value="expand", help="Print every name.")
@click.option("-c", "--count", "action", flag_value="count", help="Print how many names.")
@click.option("-l", "--list", "list_", count=True,
              help="List the groups (-ll: with their nodes).")
@click.option("-S", "--separator", default=" ", show_default=True,
              help="Between names with --expand.")
@click.option("-x", "--exclude", "exclude", multiple=True, help="Leave out this node set.")
@click.option("-i", "--intersection", multiple=True, help="Keep only what is also in this set.")
@click.option("-X", "--xor", multiple=True, help="Symmetric difference with this set.")
@click.option("--groups", "groups_path", envvar="SHOAL_GROUPS", default=None,
              help=f"Groups file or groups.d directory (default: $SHOAL_GROUPS, else"
                   f" {DEFAULT_GROUPS} if present).")
@click.argument("nodesets", nargs=-1)
def nodeset(action: str, list_: int, separator: str, exclude: tuple[str, ...],
            intersection: tuple[str, ...], xor: tuple[str, ...], groups_path: str | None,
            nodesets: tuple[str, ...]) -> None:
    """Fold, expand or count node sets: shoal nodeset -e 'node[1-3]-ib0,@gpu!node2-ib0'

    Arguments are joined with ','; '-' reads whitespace-separated sets from standard input.
    """
    from ..logic.nodegroups import Groups, GroupsError, load
    from ..logic.nodeset import NodeSetError

    try:
        path = groups_path or (DEFAULT_GROUPS if Path(DEFAULT_GROUPS).exists() else "")
        groups = load(path) if path else Groups()
    except GroupsError as e:
        fail(str(e), 2)
    if list_:
        for name in groups.names():
            if list_ > 1:
                try:
                    click.echo(f"@{name} {groups.parse('@' + name)}")
                except NodeSetError as e:
                    fail(f"@{name}: {e}", 2)
            else:
                click.echo(f"@{name}")
        return
    texts = [t for arg in nodesets
             for t in (sys.stdin.read().split() if arg == "-" else [arg])]
    if not texts:
        fail("give node sets as arguments, or '-' to read them from standard input", 2)
    try:
        ns = groups.parse(",".join(texts))
        for text in exclude:
            ns = ns - groups.parse(text)
        for text in intersection:
            ns = ns & groups.parse(text)
        for text in xor:
            ns = ns ^ groups.parse(text)
    except NodeSetError as e:
        fail(str(e), 2)
    if action == "count":
        click.echo(str(len(ns)))
    elif action == "expand":
        out = sys.stdout
        first = True
        for name in ns:  # streamed: a million names never sit in one string
            out.write(name if first else separator + name)
            first = False
        out.write(os.linesep)
    else:
        click.echo(str(ns))
