"""Node identities on the command line: ``shoal token create --join`` (join tokens, called
from token_cmds), ``shoal nodes revoke NODE`` and ``shoal admin node-identities DIR``
(docs/security.md, "Node identities")."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import msgspec

from ..config import parse_labels
from ..errors import ShoalError
from .admin_cmds import admin
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


@admin.command("node-identities")
@click.argument("directory", type=click.Path(path_type=Path))
def admin_node_identities(directory: Path) -> None:
    """Make the fleet's NATS signing keys for your own nats-servers (node identities).

    Writes, 0600, into DIRECTORY: authority.toml (the keys: `identity` in every
    controller.toml), controller.creds (the controllers' [nats] creds) and
    nats-identity.conf (include it in every nats-server's config in place of the
    accounts block). Refuses a directory that has the keys already."""
    from ..config import ensure_private_dir, write_secret_file
    from ..identity.authority import Authority

    keys = directory / "authority.toml"
    if keys.exists():
        fail(f"{keys} exists: these are the fleet's keys already (making new ones would cut "
             "off every credential); remove it first only if you mean that", 2)
    ensure_private_dir(directory)
    authority = Authority.create()
    authority.save(keys)
    write_secret_file(directory / "controller.creds", authority.controller_creds(int(time.time())))
    auth = authority.jwt_auth()
    q = msgspec.json.encode  # a JSON string is a quoted string in the NATS config format
    preload = "".join(f"  {k}: {q(v).decode()}\n" for k, v in auth.preload.items())
    write_secret_file(directory / "nats-identity.conf", (
        "# shoal node identities: operator mode (docs/security.md, 'Node identities')\n"
        f"operator: {q(auth.operator_jwt).decode()}\n"
        f"system_account: {auth.system_account}\n"
        f"resolver: {{ type: full, dir: {q(str((directory / 'accounts').resolve())).decode()}, "
        "allow_delete: false, interval: \"2m\" }\n"
        f"resolver_preload: {{\n{preload}}}\n"))
    click.echo(f"wrote {keys}, {directory / 'controller.creds'} and "
               f"{directory / 'nats-identity.conf'}; see docs/operations.md, 'Node identities'",
               err=True)
