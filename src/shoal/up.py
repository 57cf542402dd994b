"""``shoal up``: a whole local fleet in one command.

An embedded nats-server on 127.0.0.1 with generated credentials, a controller, and local
agents, all stopped together on Ctrl-C or SIGTERM. It writes under ``$SHOAL_HOME`` (created
0700; refused if another user owns it or others can write to it):

    up.toml          generated secrets, reused by the next ``shoal up`` (0600)
    controller.toml  how a controller joins this fleet (0600)
    agent.toml       how an agent joins this fleet: ``shoal agent`` reads it (0600)
    client.toml      the URL and token every other ``shoal`` command uses (0600)
    nats/            the server's config, log and JetStream store
    identity/        node identities: the fleet's signing keys (authority.toml) and the
                     controllers' credential (controller.creds), 0600
    agent-state/identity/  each local agent's own credential, NAME.creds (0600)
    tls/             with ``--tls``: the fleet's CA (ca.pem: clients verify against it), the
                     servers' certificate and the NATS users' client certificates (shoal.pki)
    nats-cluster/    with ``--nats-cluster N``: n1/ .. nN/, one such directory per server
    leaf-sites/      with ``--leaf-sites N``: site-1/ .. site-N/, each a leaf server's config
                     and log, and agent.toml for more agents of that site

With ``--nats-cluster N`` it starts N clustered servers (routes on loopback), one controller
per server and the agents spread over them (each process prefers its own server and fails over
to the others); a server that dies is started again, as a service manager would.

With ``--leaf-sites N`` the embedded server is also a hub for leaf nodes: N more servers in
leaf mode (as a remote site's would be), each dialling the hub with the leaf password and
serving one agent, ``site-K-node-1``.

Node identities are the default for a new home (docs/security.md): the servers run in
operator mode and every local agent enrolls with a join token through the controller's
``/api/v1/enroll``, as a remote machine would: each agent a host with a credential of its
own, or, past MAX_LOCAL_CREDENTIALS agents, that many hosts of several nodes each (one
credential names at most ``MAX_NAMES``). ``--shared-agent-user`` keeps the one shared
agent user instead (for virtual fleets of more nodes per process than a credential names);
a home made with it, or before node identities were the default, stays so until
``--node-identities``.

Over 400 lines: one local fleet in every shape a developer or test asks for (one server,
a cluster, leaf sites, TLS, node identities), started and stopped in order in one place.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from . import config as c
from .agent.host import AgentHost, virtual_names
from .controller.server import Controller
from .errors import ConfigError
from .natsio.natsd import (
    ClusterSpec,
    LeafListen,
    LeafServer,
    NatsCluster,
    NatsServer,
    NatsTls,
    NatsUsers,
    free_port,
)
from .system import stacks

if TYPE_CHECKING:
    from .identity.authority import Authority
    from .pki import FleetTls

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
    nats_cluster: int = 0  # > 0: a local cluster of this many servers
    leaf_sites: int = 0  # > 0: this many sites, each a leaf server with one agent
    tls: bool = False  # a generated CA; NATS with mutual TLS; the controller on HTTPS
    tls_names: tuple[str, ...] = ()  # more names (DNS or IP) the server certificate carries
    # Every node its own NATS identity (docs/security.md): operator-mode NATS, and the local
    # agents enrolled with a join token. The default for a new home; ``node_identities``
    # moves a home of the shared user; once a home has the keys it stays in this mode.
    node_identities: bool = False
    shared_agent_user: bool = False  # a new home keeps one shared agent user instead


# Node identities: the fleet's signing keys, the controller's credential.
AUTHORITY = Path("identity") / "authority.toml"
CONTROLLER_CREDS = Path("identity") / "controller.creds"
LOCAL_JOIN_LIFETIME = 86400.0  # the join token in agent.toml (made again at every start)
LOCAL_JOIN_USES = 10000
# Agent hosts (credentials) `shoal up` deals its agents into, at most (about: a cluster's
# servers each round up): each has a keeper process and a connection of its own.
MAX_LOCAL_CREDENTIALS = 16


def _fleet_tls(home: Path, opts: UpOptions) -> FleetTls | None:
    if not opts.tls:
        return None
    from .pki import fleet_pki, server_names  # cryptography: only when asked for

    return fleet_pki(home / "tls", server_names([opts.host, *opts.tls_names]),
                     ("controller", "agent"))


def _nats_tls(tls: FleetTls | None) -> NatsTls | None:
    return None if tls is None else NatsTls(str(tls.server_cert), str(tls.server_key),
                                            str(tls.ca))


def _tls_nats(tls: FleetTls | None, user: str) -> dict[str, Any]:
    """The [nats] settings a ``user`` process needs to pass the server's mutual TLS."""
    if tls is None:
        return {}
    cert, key = tls.client(user)
    return {"ca": str(tls.ca), "cert": cert, "key": key}


def _tls_http(tls: FleetTls | None) -> dict[str, str]:
    return {} if tls is None else {"tls_cert": str(tls.server_cert),
                                   "tls_key": str(tls.server_key)}


def _client_config(url: str, token: str, tls: FleetTls | None) -> c.ClientConfig:
    return c.ClientConfig(url=url, token=token, ca=str(tls.ca) if tls else "")


def _secrets(home: Path) -> tuple[str, NatsUsers]:
    path = home / "up.toml"
    if path.exists():
        data = tomllib.loads(path.read_text())
        users = NatsUsers(data["controller_password"], data["agent_password"],
                          data.get("route_password", ""), data.get("leaf_password", ""))
        if users.route_password and users.leaf_password:
            return data["token"], users
        # Written before clusters or leaf nodes: keep its secrets, add the missing ones.
        token = data["token"]
        users = NatsUsers(users.controller_password, users.agent_password,
                          users.route_password or c.new_secret(),
                          users.leaf_password or c.new_secret())
    else:
        token, users = c.new_secret(), NatsUsers.generate()
    c.write_secret_file(path, c.to_toml({"token": token,
                                         "controller_password": users.controller_password,
                                         "agent_password": users.agent_password,
                                         "route_password": users.route_password,
                                         "leaf_password": users.leaf_password}))
    return token, users


def rotate(urls: list[str], i: int) -> str:
    """Every URL, the ``i``-th first: a process that prefers that server, then the rest."""
    k = i % len(urls)
    return ",".join(urls[k:] + urls[:k])


def spread(names: list[str], groups: int) -> list[list[str]]:
    """Deal ``names`` round-robin into at most ``groups`` non-empty groups."""
    dealt = [names[i::groups] for i in range(max(1, groups))]
    return [g for g in dealt if g]


def agent_groups(names: list[str], servers: int,
                 per_credential: int = 0) -> list[tuple[int, list[str]]]:
    """The agent hosts of ``shoal up``: ``names`` dealt over ``servers``, each share cut into
    groups of at most ``per_credential`` names (0: no limit), one credential each; every
    group with the index of the server it prefers."""
    return [(i, share[k:k + (per_credential or len(share))])
            for i, share in enumerate(spread(names, servers))
            for k in range(0, len(share), per_credential or len(share))]


def split_ports(ports: str, parts: int) -> list[str]:
    """Cut a ``first-last`` port range into ``parts`` ranges, one per agent process, so
    that processes sharing a host never hand out the same port."""
    first_s, _, last_s = ports.partition("-")
    first, last = int(first_s), int(last_s or first_s)
    size = (last - first + 1) // parts
    if size < 1:
        raise ConfigError(f"port range {ports} is too small for {parts} agent processes")
    return [f"{first + i * size}-{first + (i + 1) * size - 1}" for i in range(parts)]


async def run_up(opts: UpOptions, ready: asyncio.Event | None = None) -> None:
    if opts.node_identities and opts.shared_agent_user:
        raise ConfigError("--node-identities and --shared-agent-user contradict each other: "
                          "choose one")
    if opts.nats_cluster:
        if opts.nats_url is not None:
            raise ConfigError("--nats-cluster starts its own servers: drop --nats, or drop "
                                "--nats-cluster to use the NATS at --nats")
        if opts.leaf_sites:
            raise ConfigError("--leaf-sites works with the one embedded server for now: drop "
                              "--nats-cluster, or drop --leaf-sites")
        await _run_cluster(opts, ready)
        return
    if opts.leaf_sites and opts.nats_url is not None:
        raise ConfigError("--leaf-sites needs the embedded server as the hub: drop --nats")
    home = c.ensure_home()
    identities, note = _identities(home, opts, not (home / "up.toml").exists())
    if identities and opts.leaf_sites:
        raise ConfigError("--leaf-sites works with the shared agent user only for now: start "
                          "it on a new SHOAL_HOME with --shared-agent-user (docs/operations.md)")
    groups = _agent_groups(opts, 1, identities)  # before anything is written
    authority = _authority(home) if identities else None
    token, users = _secrets(home)
    tls = _fleet_tls(home, opts)
    server: NatsServer | None = None
    leaves: list[LeafServer] = []
    if opts.nats_url is None:
        hub = LeafListen("127.0.0.1", free_port()) if opts.leaf_sites else None
        server = NatsServer(home / "nats", users, port=opts.nats_port, leafnodes=hub,
                            tls=_nats_tls(tls),
                            jwt=authority.jwt_auth() if authority is not None else None)
        server.start()  # in this thread: the server's PDEATHSIG follows the starting thread
        if hub is not None:
            leaves = _start_leaves(home, users, hub, opts.leaf_sites)
        ctl_nats, agent_nats = _nats_configs(home, server.url, users, tls, authority)
    else:  # an existing NATS: credentials come from SHOAL_NATS_* for both
        ctl_nats = c.load(c.ControllerConfig, None, {"nats": {"url": opts.nats_url}}).nats
        agent_nats = ctl_nats

    # SHOAL_* environment settings (terminal timeouts, retention...) apply here too.
    ctl_cfg = c.load(c.ControllerConfig, None, {
        "nats": c.to_builtins(ctl_nats), "host": opts.host, "port": opts.port, "token": token,
        "services_port": opts.services_port,
        "public_terminals": opts.public_terminals or None,
        "terminal_parking_url": opts.parking_url or None, **_tls_http(tls),
        "identity": str(home / AUTHORITY) if authority is not None else None})
    controller = Controller(ctl_cfg)
    hosts: list[AgentHost] = []
    site_hosts: list[AgentHost] = []
    try:
        await controller.start()
        ctl_cfg.port = controller.port
        c.save(home / "controller.toml", ctl_cfg)
        join = await _local_join(controller, tls) if authority is not None else {}
        c.save(home / "agent.toml", c.AgentConfig(nats=agent_nats, address="127.0.0.1",
                                                  **join))
        c.save(home / "client.toml", _client_config(controller.url, token, tls))
        port_ranges = split_ports(c.AgentConfig().ports, max(1, len(groups)))
        for i, (_, names) in enumerate(groups):
            host = AgentHost(c.AgentConfig(nats=agent_nats, capacity=opts.capacity,
                                           address="127.0.0.1",
                                           state_dir=str(home / "agent-state"),
                                           ports=port_ranges[i], **join), names)
            hosts.append(host)
            await host.start()
        for leaf in leaves:  # each site's agent, on its own leaf server
            site_cfg = c.AgentConfig(
                nats=c.NatsConfig(url=leaf.url, user="agent", password=users.agent_password),
                capacity=opts.capacity, address="127.0.0.1",
                state_dir=str(leaf.directory / "agent-state"))
            c.save(leaf.directory / "agent.toml", msgspec.structs.replace(
                site_cfg, capacity=c.AgentConfig().capacity, state_dir=""))
            site = AgentHost(site_cfg, [f"{leaf.name}-node-1"])
            site_hosts.append(site)
            await site.start()
        # Handlers before the banner: whoever reads it may signal us at once.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        stacks.dump_on_signal(loop)
        print(f"shoal is up: {opts.agents} agent(s), NATS at "
              f"{server.url if server else opts.nats_url}", flush=True)
        print(f"  dashboard and API: {controller.url}/?token={token}", flush=True)
        if opts.public_terminals:
            print(f"  public terminals:  {controller.url}/terminal", flush=True)
        print(f"  services:          {controller.services_url}/s/NAME/  (an origin of its own)",
              flush=True)
        for leaf in leaves:
            print(f"  site {leaf.name}: leaf NATS {leaf.url} -> hub {leaf.hubs[0].host}:"
                  f"{leaf.hubs[0].port}  agent {leaf.name}-node-1  (agent config "
                  f"{leaf.directory / 'agent.toml'})", flush=True)
        print(f"  client config:     {home / 'client.toml'}  (shoal run, shoal nodes ...)",
              flush=True)
        _print_tls(tls)
        _print_identities(home, authority, hosts, note)
        print("  add agents:        shoal agent --name NAME   (same SHOAL_HOME)", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        print("shoal: stopping", flush=True)
    finally:
        # Each step runs even if one before it failed: nothing may be left behind.
        try:
            await asyncio.gather(*(h.stop() for h in [*site_hosts, *hosts]),
                                 return_exceptions=True)
        finally:
            try:
                await controller.stop()
            finally:
                await asyncio.gather(*(leaf.astop() for leaf in leaves))
                if server is not None:
                    await server.astop()


def _identities(home: Path, opts: UpOptions, fresh: bool) -> tuple[bool, str]:
    """Whether this home uses node identities, and a note when it does not: a new home
    does (unless ``--shared-agent-user``), a home made with them does (a home never falls
    back to the shared agent user), ``--node-identities`` moves a home of the shared user.
    With ``--nats`` the servers are yours: ``shoal admin node-identities`` makes what they
    include. Decides only: nothing is written."""
    if (home / AUTHORITY).exists():
        if opts.shared_agent_user:
            raise ConfigError(f"{home} has node identities ({home / AUTHORITY}); a home never "
                              "goes back to the shared agent user: use another SHOAL_HOME for "
                              "--shared-agent-user")
    elif opts.shared_agent_user:
        return False, ("the shared agent user (--shared-agent-user): every agent may act as "
                       "every node (docs/security.md)")
    elif opts.nats_url is not None and not opts.node_identities:
        return False, ""  # your NATS, your users (SHOAL_NATS_*)
    elif not (fresh or opts.node_identities):
        return False, ("this SHOAL_HOME uses the shared agent user (made before node "
                       "identities were the default); shoal up --node-identities moves it "
                       "(docs/security.md, 'Moving to node identities')")
    if opts.nats_url is not None:
        raise ConfigError("node identities with --nats: your nats-servers need the fleet's "
                          "operator (shoal admin node-identities DIR, docs/operations.md); "
                          "shoal up's node identities are for its own servers")
    return True, ""


def _authority(home: Path) -> Authority:
    """The fleet's NATS signing keys, made on the first start of the home."""
    from .identity.authority import Authority

    path = home / AUTHORITY
    c.ensure_private_dir(path.parent)
    return Authority.load_or_create(path)


def _agent_groups(opts: UpOptions, servers: int, identities: bool,
                  ) -> list[tuple[int, list[str]]]:
    """The local agents' hosts. With node identities each agent is a host (a credential)
    of its own, as separate machines would be, while there are at most
    MAX_LOCAL_CREDENTIALS of them; more are packed that many credentials' worth, each
    naming at most MAX_NAMES nodes (what one credential may name)."""
    from .wire.enrollment import MAX_NAMES

    names = virtual_names("node-", opts.agents) if opts.agents else []
    if not identities:
        return agent_groups(names, servers)
    per = max(1, -(-len(names) // MAX_LOCAL_CREDENTIALS))
    if per > MAX_NAMES:
        raise ConfigError(
            f"--agents {opts.agents} with node identities: shoal up gives its agents at most "
            f"{MAX_LOCAL_CREDENTIALS} credentials of at most {MAX_NAMES} nodes each: use "
            f"--agents {MAX_LOCAL_CREDENTIALS * MAX_NAMES} or fewer, or a new SHOAL_HOME with "
            "--shared-agent-user for a large virtual fleet (docs/operations.md)")
    return agent_groups(names, servers, per)


def _nats_configs(home: Path, url: str, users: NatsUsers, tls: FleetTls | None,
                  authority: Authority | None) -> tuple[c.NatsConfig, c.NatsConfig]:
    """How the controllers and the agents connect to ``url``: the controllers' credential
    (made at every start) and nothing for the agents, who enroll; or the two passwords."""
    if authority is not None:
        creds = home / CONTROLLER_CREDS
        c.write_secret_file(creds, authority.controller_creds(int(time.time())))
        return (c.NatsConfig(url=url, creds=str(creds), **_tls_nats(tls, "controller")),
                c.NatsConfig(url=url, **_tls_nats(tls, "agent")))
    return (c.NatsConfig(url=url, user="controller", password=users.controller_password,
                         **_tls_nats(tls, "controller")),
            c.NatsConfig(url=url, user="agent", password=users.agent_password,
                         **_tls_nats(tls, "agent")))


def _print_identities(home: Path, authority: Authority | None, hosts: list[AgentHost],
                      note: str) -> None:
    if authority is not None:
        print(f"  node identities:   {len(hosts)} agent credential(s) in "
              f"{home / 'agent-state' / 'identity'}; agent.toml holds a join token for more",
              flush=True)
    elif note:
        print(f"  note: {note}", flush=True)


async def _local_join(controller: Controller, tls: FleetTls | None) -> dict[str, Any]:
    """A join token for the agents of this home (``shoal up``'s own and every
    ``shoal agent --name NAME`` with the same SHOAL_HOME), as agent.toml settings."""
    from .wire.enrollment import NewJoinToken

    made = await controller.enrollment.create_token(
        NewJoinToken(expires=LOCAL_JOIN_LIFETIME, uses=LOCAL_JOIN_USES), by="shoal up")
    return {"join_url": controller.url, "join_token": made.token,
            "join_ca": str(tls.ca) if tls is not None else ""}


def _start_leaves(home: Path, users: NatsUsers, hub: LeafListen, sites: int,
                  ) -> list[LeafServer]:
    """``--leaf-sites N``: site-1..site-N, each a leaf server on loopback dialling ``hub``,
    under ``$SHOAL_HOME/leaf-sites/``. Started in this thread (PDEATHSIG)."""
    leaves: list[LeafServer] = []
    try:
        for k in range(1, sites + 1):
            name = f"site-{k}"
            leaf = LeafServer(home / "leaf-sites" / name, users, [hub], server_name=name)
            leaves.append(leaf)
            leaf.start()
    except BaseException:
        for leaf in leaves:
            leaf.stop()
        raise
    return leaves


def _print_tls(tls: FleetTls | None) -> None:
    if tls is not None:
        print(f"  TLS:               CA {tls.ca}  (HTTPS and mutual-TLS NATS; browsers and "
              "other clients verify against it)", flush=True)


async def _run_cluster(opts: UpOptions, ready: asyncio.Event | None) -> None:
    """``shoal up --nats-cluster N``: N servers, N controllers, agents spread over them.
    With node identities every server runs in operator mode with the same operator and a
    full resolver of its own: an account update (a revocation) pushed to one reaches all."""
    home = c.ensure_home()
    identities, note = _identities(home, opts, not (home / "up.toml").exists())
    groups = _agent_groups(opts, opts.nats_cluster, identities)  # before anything is written
    authority = _authority(home) if identities else None
    token, users = _secrets(home)
    tls = _fleet_tls(home, opts)
    spec = ClusterSpec.allocate(opts.nats_cluster, first_port=opts.nats_port)
    cluster = NatsCluster(home / "nats-cluster", users, spec, tls=_nats_tls(tls),
                          jwt=authority.jwt_auth() if authority is not None else None)
    cluster.start()  # in this thread: the servers' PDEATHSIG follows the starting thread
    controllers: list[Controller] = []
    hosts: list[AgentHost] = []
    supervisor: asyncio.Task[None] | None = None
    try:
        every, agent_every = _nats_configs(home, cluster.url, users, tls, authority)
        await cluster.wait_formed(every)
        supervisor = asyncio.create_task(cluster.supervise())
        urls = cluster.urls
        for i in range(len(urls)):
            # Each controller prefers its own server; with --port P they take P, P+1, ...
            # and their services listeners P+N, P+N+1, ... (never another one's port).
            ctl_nats = msgspec.structs.replace(every, url=rotate(urls, i), randomize=False)
            cfg = c.load(c.ControllerConfig, None, {
                "nats": c.to_builtins(ctl_nats), "host": opts.host,
                "port": opts.port + i if opts.port else 0,
                "services_port": opts.port + len(urls) + i if opts.port else 0, "token": token,
                "public_terminals": opts.public_terminals or None,
                "terminal_parking_url": opts.parking_url or None, **_tls_http(tls),
                "identity": str(home / AUTHORITY) if authority is not None else None})
            ctl = Controller(cfg)
            controllers.append(ctl)
            await ctl.start()
            cfg.port = ctl.port
        first = controllers[0].cfg
        c.save(home / "controller.toml", msgspec.structs.replace(first, nats=every))
        join = await _local_join(controllers[0], tls) if authority is not None else {}
        c.save(home / "agent.toml", c.AgentConfig(nats=agent_every, address="127.0.0.1",
                                                  **join))
        c.save(home / "client.toml", _client_config(
            ",".join(ctl.url for ctl in controllers), token, tls))
        port_ranges = split_ports(c.AgentConfig().ports, max(1, len(groups)))
        where: dict[int, list[str]] = {}
        for k, (i, names) in enumerate(groups):
            agent_cfg = c.AgentConfig(
                nats=msgspec.structs.replace(agent_every, url=rotate(urls, i),
                                             randomize=False),
                capacity=opts.capacity, address="127.0.0.1",
                state_dir=str(home / "agent-state"), ports=port_ranges[k], **join)
            host = AgentHost(agent_cfg, names)
            hosts.append(host)
            await host.start()
            where.setdefault(i, []).extend(names)
        print(f"shoal is up: {opts.agents} agent(s), NATS cluster {spec.name!r} of "
              f"{len(urls)} servers, {controllers[0].replicas} replicas per bucket and stream",
              flush=True)
        print(f"  dashboard and API: {controllers[0].url}/?token={token}", flush=True)
        for i, server in enumerate(cluster.servers):
            agents = ", ".join(where.get(i, [])) or "none"
            print(f"  {server.name}: NATS {server.url}  controller {controllers[i].url}  "
                  f"services {controllers[i].services_url}  agents {agents}  "
                  f"(store {server.directory})", flush=True)
        for ctl in controllers:
            if ctl.replica_advice:
                print(f"  note: {ctl.replica_advice}", flush=True)
                break
        if opts.public_terminals:
            print(f"  public terminals:  {controllers[0].url}/terminal", flush=True)
        print(f"  client config:     {home / 'client.toml'}  (shoal run, shoal nodes ...)",
              flush=True)
        _print_tls(tls)
        _print_identities(home, authority, hosts, note)
        print("  add agents:        shoal agent --name NAME   (same SHOAL_HOME)", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        if ready is not None:
            ready.set()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        stacks.dump_on_signal(loop)
        await stop.wait()
        print("shoal: stopping", flush=True)
    finally:
        # Agents first (they record final states through NATS), the servers last.
        try:
            await asyncio.gather(*(h.stop() for h in hosts), return_exceptions=True)
            await asyncio.gather(*(ctl.stop() for ctl in controllers), return_exceptions=True)
        finally:
            if supervisor is not None:
                supervisor.cancel()
                await asyncio.gather(supervisor, return_exceptions=True)
            await cluster.astop()
