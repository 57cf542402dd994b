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
from ..errors import ConfigError

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


def _mounts(ctx: click.Context, param: click.Parameter,
            value: tuple[str, ...]) -> list[dict[str, str]]:
    out = []
    for item in value:
        source, sep, target = item.partition(":")
        if not sep or not source or not target:
            raise ConfigError(f"--mount {item!r} is not SOURCE:TARGET; write it like "
                                "--mount /srv/data:/data (read-only)")
        out.append({"source": source, "target": target})
    return out


def container_options(f: F) -> F:
    """``--image --container-port --network --mount``: run in a container
    (docs/containers.md); the command gets ``container: dict`` (empty for a process)."""
    opts = [
        click.option("--image", default=None, metavar="IMAGE",
                     help="Run in a container of this image (podman, on nodes that can; the "
                          "command is optional: the image's own runs without one)."),
        click.option("--container-port", "container_ports", type=click.IntRange(1, 65535),
                     multiple=True, metavar="PORT",
                     help="Container port published on an allocated host port ($PORT), "
                          "repeatable, in order."),
        click.option("--network", default=None, metavar="NAME",
                     help="The container's podman network (default none: no network; "
                          "ports need one, e.g. podman)."),
        click.option("--mount", "mounts", multiple=True, metavar="SOURCE:TARGET",
                     callback=_mounts, help="Read-only bind mount (under the node's "
                                            "container_mounts), repeatable."),
    ]

    @functools.wraps(f)
    def command(*args: Any, image: str | None, container_ports: tuple[int, ...],
                network: str | None, mounts: list[dict[str, str]], **kwargs: Any) -> Any:
        container: dict[str, Any] = {}
        if image is not None:
            container = {"runtime": "container", "image": image,
                         "container_ports": list(container_ports), "mounts": mounts,
                         "network": network or ("podman" if container_ports else "none")}
        elif container_ports or network or mounts:
            raise ConfigError("--container-port, --network and --mount are for containers: "
                                "add --image IMAGE")
        return f(*args, container=container, **kwargs)

    for opt in reversed(opts):
        command = opt(command)
    return command  # type: ignore[return-value]


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
