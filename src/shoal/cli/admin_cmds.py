"""``shoal admin ...``: operations on the NATS side of a fleet, run where a controller's
configuration (and so its NATS credentials) is."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config as c
from .main import arun, fail, main


@main.group()
def admin() -> None:
    """Operator commands that talk to NATS directly (with the controller's credentials)."""


@admin.command("upgrade-replicas")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="Controller TOML config (default: $SHOAL_HOME/controller.toml).")
@click.option("--nats", "nats_url", help="NATS URL(s), comma-separated.")
@click.option("--replicas", type=click.IntRange(1, 5), default=None,
              help="Target count (default: 3, or the cluster's size when smaller).")
@click.option("--dry-run", is_flag=True, help="Only show each bucket's and stream's count.")
@click.option("--wait", type=click.FloatRange(0, 3600), default=60.0, show_default=True,
              help="Seconds to wait for the new copies to catch up.")
def upgrade_replicas(config_path: Path | None, nats_url: str | None, replicas: int | None,
                     dry_run: bool, wait: float) -> None:
    """Raise the replicas of shoal's buckets and streams to what the NATS cluster allows.

    Safe on a live fleet: NATS copies each stream to its new servers while it keeps serving.
    """
    from ..natsio import bus
    from ..natsio import replicas as r

    cfg = c.load(c.ControllerConfig, config_path or c.shoal_home() / "controller.toml",
                 {"nats": {"url": nats_url}})

    async def go() -> None:
        nc = await bus.connect(cfg.nats, "shoal-admin")
        try:
            size = r.cluster_size(nc)
            want = r.wanted(replicas or cfg.replicas, size)
            if replicas and replicas > size:
                fail(f"the NATS cluster has {size} server(s): it cannot keep {replicas} "
                     f"replicas; use --replicas {size} or fewer", 2)
            found = await r.assets(nc)
            for a in found:
                mark = "ok" if a.replicas >= want else f"-> {want}"
                click.echo(f"{a.stream}: {a.replicas} replica(s), {a.current} current  {mark}")
            if dry_run:
                low = r.lagging(found, want)
                click.echo(f"{len(low)} of {len(found)} below {want} (cluster of {size})")
                return
            changed = await r.upgrade(nc, want, wait)
            for stream, before, after in changed:
                click.echo(f"raised {stream}: {before} -> {after}")
            click.echo(f"all {len(found)} at {want} or more replicas" if found
                       else "no shoal buckets yet: a controller creates them at its start")
        finally:
            await bus.close(nc)

    arun(go())
