"""Options more than one command takes, each parsed once: ``-e NAME=VALUE``, ``key=value``
labels and selectors, ``--json``, and the node targets of ``run``, ``copy`` and ``rcopy``.

A bad value ends the command while click parses it (status 2, one ``shoal: ...`` line), so
a command's body only ever sees a ``dict``: ``session create -e FOO`` is refused as ``run -e
FOO`` is, never sent without the variable.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import config as c

F = TypeVar("F", bound=Callable[..., Any])


def _parsed(parse: Callable[[tuple[str, ...]], dict[str, str]]
            ) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], dict[str, str]]:
    # Its ConfigError ends the command with status 2 (main.EXIT_CODES), before it runs.
    return lambda ctx, param, value: parse(value)


def env_option(help: str = "NAME=VALUE (repeatable).") -> Callable[[F], F]:
    """``-e/--env NAME=VALUE``, repeatable; the command gets ``env: dict[str, str]``."""
    return click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE", help=help,
                        callback=_parsed(c.parse_env))


def labels_option(*decls: str, dest: str = "labels",
                  help: str = "key=value (repeatable).") -> Callable[[F], F]:
    """A repeatable ``key=value`` option (labels, selectors); the command gets a dict
    (empty when not given)."""
    return click.option(*decls, dest, multiple=True, metavar="KEY=VALUE", help=help,
                        callback=_parsed(c.parse_labels))


def json_option(help: str = "The record as JSON.") -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def prints_record(human: Callable[[Any], None] | None = None,
                  help: str = "The record as JSON.") -> Callable[[Callable[..., Any]],
                                                                 Callable[..., None]]:
    """``--json`` for a command that returns what it printed: with ``--json`` that record
    is printed as JSON, else ``human`` prints it (None: nothing)."""
    def decorate(f: Callable[..., Any]) -> Callable[..., None]:
        @functools.wraps(f)
        def command(*args: Any, as_json: bool, **kwargs: Any) -> None:
            record = f(*args, **kwargs)
            if as_json:
                print_json(record)
            elif human is not None:
                human(record)
        return json_option(help)(command)
    return decorate


def print_json(record: Any) -> None:
    """A record (a message, a list of them, a dict) as one line of JSON on stdout."""
    from ..wire.messages import to_json

    sys.stdout.write(to_json(record).decode() + "\n")
    sys.stdout.flush()


def target_options(f: F) -> F:
    """``-a -n -x -g -X -l``: which agent nodes (``group_refs`` folds the groups in)."""
    for opt in reversed([
        click.option("-a", "--all", "all_", is_flag=True, help="Every node that is up."),
        click.option("-n", "--nodes", "nodeset", default="",
                     help="Node set: node[1-8,12],web3."),
        click.option("-x", "--exclude", default="", help="Node set to leave out."),
        click.option("-g", "--group", "groups", multiple=True,
                     help="Node group (@GROUP; from the groups file or labels), repeatable."),
        click.option("-X", "--exclude-group", "xgroups", multiple=True,
                     help="Node group to leave out."),
        labels_option("-l", "--label", help="key=value selector (repeatable)."),
    ]):
        f = opt(f)
    return f


def group_refs(first: str, groups: tuple[str, ...]) -> str:
    """A node set and ``-g`` groups as one node set: ``web1,@gpu``."""
    return ",".join(x for x in (first, *(g if g.startswith("@") else "@" + g for g in groups))
                    if x)
