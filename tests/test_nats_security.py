"""What an agent's NATS credential cannot do: read controllers' replies, or touch session
records (the controllers write them from the agents' reports); and a record that a
controller did not make is never launched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from fleet import Fleet
from shoal.client.aio import Client
from shoal.config import AgentConfig, ControllerConfig, load
from shoal.natsio import bus
from shoal.wire import messages as m
from shoal.wire.subjects import SESSIONS_BUCKET


async def _agent_nc(fleet: Fleet, errors: list[str]) -> nats.aio.client.Client:
    cfg = load(AgentConfig, fleet.home / "agent.toml")

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(cfg.nats.url, error_cb=on_error, **fleet.agent_nats())


async def test_agents_cannot_read_controller_inboxes(fleet: Fleet) -> None:
    errors: list[str] = []
    nc = await _agent_nc(fleet, errors)
    try:
        async def ignore(msg: object) -> None:
            pass

        await nc.subscribe("_INBOX.>", cb=ignore)
        await nc.flush()
        await asyncio.sleep(0.3)
        assert any("permissions violation" in e.lower() for e in errors), errors
    finally:
        await nc.close()


async def test_agents_cannot_touch_session_records(fleet: Fleet) -> None:
    """The shared agent user (password mode) reads, writes and watches no session record:
    one code path with node identities (agents report, controllers write)."""
    errors: list[str] = []
    nc = await _agent_nc(fleet, errors)
    try:
        with pytest.raises(nats.errors.Error):
            await nc.jetstream().key_value(SESSIONS_BUCKET)
        await nc.publish(f"$KV.{SESSIONS_BUCKET}.planted", b"{}")
        await nc.flush()
        await asyncio.sleep(0.3)
        assert any("permissions violation" in e.lower() and SESSIONS_BUCKET in e
                   for e in errors), errors
    finally:
        await nc.close()


async def test_a_planted_session_is_never_launched(fleet: Fleet, tmp_path: Path) -> None:
    """A record written into the bucket by anything but a controller's own code (here with
    the controllers' NATS credential itself) has no valid seal: it ends failed, unrun."""
    marker = tmp_path / "planted-ran"
    # The controllers' own credential (a password, or their .creds under node identities)
    nc = await bus.connect(load(ControllerConfig, fleet.home / "controller.toml").nats, "test")
    try:
        kv = await nc.jetstream().key_value(SESSIONS_BUCKET)
        spec = m.SessionSpec(id="planted", command=["touch", str(marker)])
        record = m.SessionRecord(id="planted", spec=spec, created=time.time() - 60,
                                 seal="f" * 64)
        await kv.put("planted", msgspec.json.encode(record))
    finally:
        await nc.close()
    async with Client(fleet.url, fleet.token) as c:
        done = await c.wait("planted", timeout=30)
        assert done.state == "failed" and "not made by a controller" in done.reason
        await c.remove("planted")
    assert not marker.exists()
