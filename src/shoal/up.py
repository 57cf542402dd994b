"""``shoal up``: a whole local fleet in one command.

An embedded nats-server on 127.0.0.1 with generated credentials, a controller, and local
agents, all stopped together on Ctrl-C or SIGTERM. It writes under ``$SHOAL_HOME`` (created
0700; refused if another user owns it or others can write to it):

    up.toml          generated secrets, reused by the next ``shoal up`` (0600)
    controller.toml  how a controller joins this fleet (0600)
    agent.toml       how an agent joins this fleet: ``shoal agent`` reads it (0600)
    client.toml      the URL and token every other ``shoal`` command uses (0600)
    nats/            the server's config, log and JetStream store
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import config as c
from .agent.host import AgentHost, virtual_names
from .controller.server import Controller
from .natsd import NatsServer, NatsUsers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpOptions:
    agents: int = 2
    capacity: int = 16
    port: int = c.DEFAULT_HTTP_PORT
    services_port: int = c.SERVICES_PORT_NEXT
    host: str = "127.0.0.1"
    nats_url: str | None = None
    nats_port: int = 0
    public_terminals: bool = False
    parking_url: str = ""


def _secrets(home: Path) -> tuple[str, NatsUsers]:
    path = home / "up.toml"
    if path.exists():
        data = tomllib.loads(path.read_text())
        return data["token"], NatsUsers(data["controller_password"], data["agent_password"])
    token, users = c.new_secret(), NatsUsers.generate()
    c.write_secret_file(path, c.to_toml({"token": token,
                                         "controller_password": users.controller_password,
                                         "agent_password": users.agent_password}))
    return token, users


async def run_up(opts: UpOptions, ready: asyncio.Event | None = None) -> None:
    home = c.ensure_home()
    token, users = _secrets(home)
    server: NatsServer | None = None
    if opts.nats_url is None:
        server = NatsServer(home / "nats", users, port=opts.nats_port)
        server.start()  # in this thread: the server's PDEATHSIG follows the starting thread
        ctl_nats = c.NatsConfig(url=server.url, user="controller",
                                password=users.controller_password)
        agent_nats = c.NatsConfig(url=server.url, user="agent", password=users.agent_password)
    else:  # an existing NATS: credentials come from SHOAL_NATS_* for both
        ctl_nats = c.load(c.ControllerConfig, None, {"nats": {"url": opts.nats_url}}).nats
        agent_nats = ctl_nats

    # SHOAL_* environment settings (terminal timeouts, retention...) apply here too.
    ctl_cfg = c.load(c.ControllerConfig, None, {
        "nats": c.to_builtins(ctl_nats), "host": opts.host, "port": opts.port, "token": token,
        "services_port": opts.services_port,
        "public_terminals": opts.public_terminals or None,
        "terminal_parking_url": opts.parking_url or None})
    controller = Controller(ctl_cfg)
    agents: AgentHost | None = None
    try:
        await controller.start()
        ctl_cfg.port = controller.port
        c.save(home / "controller.toml", ctl_cfg)
        agent_cfg = c.AgentConfig(nats=agent_nats, capacity=opts.capacity,
                                  address="127.0.0.1", state_dir=str(home / "agent-state"))
        c.save(home / "agent.toml", c.AgentConfig(nats=agent_nats, address="127.0.0.1"))
        c.save(home / "client.toml", c.ClientConfig(url=controller.url, token=token))
        if opts.agents > 0:
            agents = AgentHost(agent_cfg, virtual_names("node-", opts.agents))
            await agents.start()
        # Handlers before the banner: whoever reads it may signal us at once.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        print(f"shoal is up: {opts.agents} agent(s), NATS at "
              f"{server.url if server else opts.nats_url}", flush=True)
        print(f"  dashboard and API: {controller.url}/?token={token}", flush=True)
        if opts.public_terminals:
            print(f"  public terminals:  {controller.url}/terminal", flush=True)
        print(f"  services:          {controller.services_url}/s/NAME/  (an origin of its own)",
              flush=True)
        print(f"  client config:     {home / 'client.toml'}  (shoal run, shoal nodes ...)",
              flush=True)
        print("  add agents:        shoal agent --name NAME   (same SHOAL_HOME)", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        print("shoal: stopping", flush=True)
    finally:
        # Each step runs even if one before it failed: nothing may be left behind.
        try:
            if agents is not None:
                await agents.stop()
        finally:
            try:
                await controller.stop()
            finally:
                if server is not None:
                    await server.astop()
