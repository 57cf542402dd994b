"""Node identities on the command line: ``shoal token create --join`` (join tokens, called
from token_cmds) and ``shoal nodes revoke NODE`` (docs/security.md, "Node identities")."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ..config import parse_labels
from ..errors import ShoalError
from .main import arun, client_from, fail, nodes


def create_join(ctx: click.Context, expires: float | None, uses: int, labels: tuple[str, ...],
                name: str, as_json: bool) -> None:
    """Make a join token and print it once (only its hash is kept)."""
    try:
        fixed = parse_labels(labels)
    except ShoalError as e:
        fail(e.message, 2)
    if expires is None:
        fail("a join token needs an end: give --expires (such as 1h or 7d)", 2)

    async def go() -> dict[str, Any]:
        async with client_from(ctx) as client:
            return await client.request(  # type: ignore[no-any-return]
                "POST", "/api/v1/join-tokens",
                json={"expires": expires, "uses": uses, "labels": fixed, "name": name})

    made = arun(go())
    if as_json:
        click.echo(json.dumps(made, indent=2))
        return
    click.echo(made["token"])
    what = f"node {made['name']}" if made["name"] else f"up to {made['uses']} node name(s)"
    bound = f", labels {made['labels']}" if made["labels"] else ""
    ends = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made["expires"]))
    click.echo(f"join token {made['id']}: enrolls {what}{bound}; expires {ends}; it is shown "
               "only now. On the node: shoal agent --join CONTROLLER_URL --token TOKEN",
               err=True)


@nodes.command("revoke")
@click.argument("name")
@click.pass_context
def nodes_revoke(ctx: click.Context, name: str) -> None:
    """Cut a node off now: NATS closes its connection and refuses its credential; its
    sessions are handled as for a lost node. It can join again only with a new name."""
    async def go() -> dict[str, Any]:
        async with client_from(ctx) as client:
            return await client.request(  # type: ignore[no-any-return]
                "POST", f"/api/v1/nodes/{name}/revoke")

    done = arun(go())
    click.echo(f"revoked {', '.join(done['names'])}", err=True)
