"""Node identities on the command line: ``shoal token create --join`` (join tokens, called
from token_cmds), ``shoal nodes revoke NODE`` and ``shoal admin node-identities DIR``
(docs/security.md, "Node identities")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from .admin_cmds import admin
from .main import fail, with_client
from .node_cmds import nodes
from .options import prints_record

if TYPE_CHECKING:
    from ..client.sync import SyncClient


def create_join(client: SyncClient, expires: float | None, uses: int, labels: dict[str, str],
                name: str) -> dict[str, Any]:
    """Make a join token (printed once by ``print_join``: only its hash is kept)."""
    if expires is None:
        fail("a join token needs an end: give --expires (such as 1h or 7d)", 2)
    made: dict[str, Any] = client.request("POST", "/api/v1/join-tokens", json={
        "expires": expires, "uses": uses, "labels": labels, "name": name})
    return made


def print_join(made: dict[str, Any]) -> None:
    click.echo(made["token"])
    what = f"node {made['name']}" if made["name"] else f"up to {made['uses']} node name(s)"
    bound = f", labels {made['labels']}" if made["labels"] else ""
    ends = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(made["expires"]))
    click.echo(f"join token {made['id']}: enrolls {what}{bound}; expires {ends}; it is shown "
               "only now. On the node: shoal agent --join CONTROLLER_URL --token TOKEN",
               err=True)


@nodes.command("revoke")
@click.argument("name")
@prints_record(lambda done: click.echo(f"revoked {', '.join(done['names'])}", err=True),
               "The revoked identity (its names and when) as JSON.")
@with_client
def nodes_revoke(client: SyncClient, name: str) -> dict[str, Any]:
    """Cut a node off now: NATS closes its connection and refuses its credential; its
    sessions are handled as for a lost node. It can join again only with a new name."""
    done: dict[str, Any] = client.request("POST", f"/api/v1/nodes/{name}/revoke")
    return done


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
    from ..natsio.natsd import MAX_CONTROL_LINE, RESOLVER_SYNC

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
        f"allow_delete: false, interval: \"{RESOLVER_SYNC}\" }}\n"
        f"resolver_preload: {{\n{preload}}}\n"
        "# A node credential's JWT rides in the CONNECT line (one of 64 nodes: ~45 KB).\n"
        f"max_control_line: {MAX_CONTROL_LINE}\n"))
    click.echo(f"wrote {keys}, {directory / 'controller.creds'} and "
               f"{directory / 'nats-identity.conf'}; see docs/operations.md, 'Node identities'",
               err=True)
