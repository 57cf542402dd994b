"""``shoal bridge ...``: other systems' protocols served by the fleet (docs/pycloud.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .main import checking, fail, main, setup_logging, with_client
from .options import labels_option

if TYPE_CHECKING:
    from ..client.aio import Client


@main.group()
def bridge() -> None:
    """Serve another system's clients from this fleet."""


@bridge.command("pycloud")
@click.option("--redis", "redis_url", envvar="SHOAL_PYCLOUD_REDIS", required=True,
              help="Redis URL, e.g. redis://127.0.0.1:6379/0 (or SHOAL_PYCLOUD_REDIS, which "
                   "keeps a password out of the process list).")
@click.option("--prefix", default="year4000.pycloud", show_default=True,
              help="Channel prefix: requests on PREFIX.create/.status/.remove.")
@click.option("--name", default="", help="This bridge's name in replies and claims "
                                         "(default: HOST-PID).")
@click.option("--user", type=click.Choice(["agent", "ephemeral"]), default="agent",
              show_default=True, help="Run scripts as the agent's user or a throwaway user.")
@labels_option("-l", "--label",
               help="key=value: place scripts only on nodes with these labels (repeatable).")
@click.option("--network", default="podman", show_default=True,
              help="The podman network of Docker scripts with a port (one without a port "
                   "gets none).")
@click.option("-v", "--verbose", is_flag=True)
def bridge_pycloud(redis_url: str, prefix: str, name: str, user: str, labels: dict[str, str],
                   network: str, verbose: bool) -> None:
    """Answer PyCloud's Redis requests (create, status, remove) with sessions on this fleet.

    Run as many as you like on the same Redis: each request is answered once."""
    import msgspec

    from ..wire import messages as m

    try:
        from ..bridges.pycloud import run_bridge
    except ImportError as e:
        fail(f"the PyCloud bridge needs redis-py ({e}); install it with "
             "pip install 'shoal[pycloud]'", 2)
    with checking("--label"):
        selector = msgspec.convert(labels, m.Labels)
    if not prefix or any(ch in prefix for ch in " *?[]"):
        fail(f"--prefix {prefix!r}: give a channel prefix without spaces or wildcards", 2)
    setup_logging(verbose)

    @with_client
    async def serve(client: Client) -> None:
        await run_bridge(client, redis_url, name=name, prefix=prefix, user=user,
                         selector=selector, network=network)

    serve()
