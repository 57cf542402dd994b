"""Container sessions: the podman driver (start, poll, stop, remove what a dead agent left).

It drives podman's command line, not its REST API: the API needs a long-running
``podman system service`` and a socket to guard, while the CLI is one exec per operation and a
foreground ``podman run`` is an ordinary child process. Its stdout and stderr (or the pty it
is given) carry the container's output, its exit status is the container's, and it forwards
the signals it gets (``--sig-proxy``, the default), so the agent can own it through the same
contract as a local process. What the CLI process does not cover, this module does:

- a SIGKILL of the ``podman run`` process (or of its cgroup) leaves the container running
  under conmon, so ``stop`` ends the container by name, and every container carries the
  labels ``io.shoal.node`` and ``io.shoal.session`` so that a restarted agent finds and
  removes what the last one left (``remove_leftovers``);
- images are never pulled (``--pull never``): they come from the operator (``podman load`` /
  ``podman import``);
- the runtime is explicit (``runc``: ``crun`` refuses a hybrid cgroup layout) and so are the
  ulimits (podman's defaults fail on some hosts); ``--init`` gives the container a PID 1 that
  passes SIGTERM on, so a stop takes effect at once rather than after podman's own timeout.

Host ports are allocated by the agent (``agent/ports.py``) and published on one address:
127.0.0.1 unless the agent's ``container_publish`` names another (the node's own address on a
fleet of several machines, so that controllers elsewhere reach a container replica).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ..wire import messages as m

LABEL_NODE = "io.shoal.node"
LABEL_SESSION = "io.shoal.session"
COMMAND_TIMEOUT = 60.0  # for podman's short commands (inspect, stop, rm, ps)

ImageRef = m.ImageRef
NetworkName = m.NetworkName
Port = m.ContainerPort
ContainerPath = m.ContainerPath
Mount = m.Mount  # a read-only bind mount of a host directory or file the agent allows
# Network modes that reach the host's own network (its loopback, where NATS listens), which is
# what `network` exists to prevent. (`container:ID`, `ns:PATH` cannot pass the name pattern.)
REFUSED_NETWORKS = frozenset({"host", "slirp4netns", "pasta"})


class PortMap(Struct, frozen=True, forbid_unknown_fields=True):
    container: Port
    host: Port


class ContainerSpec(Struct, frozen=True, forbid_unknown_fields=True):
    image: ImageRef
    command: m.Argv | None = None  # None: the image's own command
    env: m.EnvMap = {}
    cwd: ContainerPath | None = None
    ports: Annotated[list[PortMap], Meta(max_length=64)] = []
    mounts: Annotated[list[Mount], Meta(max_length=64)] = []
    network: NetworkName = "none"
    memory_mb: Annotated[int, Meta(ge=6, le=4_000_000)] | None = None
    pids: Annotated[int, Meta(ge=1, le=1_000_000)] = 1024
    cpus: Annotated[float, Meta(gt=0, le=4096)] | None = None
    cpu_shares: Annotated[int, Meta(ge=2, le=262144)] | None = None
    open_files: Annotated[int, Meta(ge=16, le=1_000_000)] = 1024
    processes: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    tty: bool = False
    stdin: bool = False


class ContainerState(Struct, frozen=True):
    name: str
    status: str  # podman's: created, running, exited, ...
    exit_code: int
    oom_killed: bool

    @property
    def running(self) -> bool:
        return self.status in ("created", "running", "paused", "stopping")


class ContainerError(Exception):
    """podman could not do what was asked; the message says what to do."""


def container_name(node: str, session: str) -> str:
    return f"shoal-{node}-{session}"


def from_session(spec: m.SessionSpec, ports: Sequence[int], env: Mapping[str, str],
                 ) -> ContainerSpec:
    """The container a session spec asks for: ``shell`` runs under the image's /bin/sh,
    neither command nor shell runs the image's own command; each allocated host port is
    published to the container port at the same place in ``container_ports``; limits are
    the container's (memory, processes as its pids limit, CPU weight as its shares)."""
    if spec.image is None:
        raise ContainerError("a container session needs an image")
    command = (["/bin/sh", "-c", spec.shell] if spec.shell is not None
               else list(spec.command) if spec.command is not None else None)
    if len(spec.container_ports) > len(ports):
        raise ContainerError(f"{len(spec.container_ports)} container port(s) but only "
                             f"{len(ports)} allocated: set ports to match")
    limits = spec.limits
    given: dict[str, Any] = {}  # the rest keep ContainerSpec's defaults
    if limits.processes:
        given.update(pids=limits.processes, processes=limits.processes)
    if limits.open_files:
        given.update(open_files=limits.open_files)
    if limits.cpu_weight:
        given.update(cpu_shares=max(2, limits.cpu_weight * 1024 // 100))
    return ContainerSpec(
        image=spec.image, command=command, env=dict(env), cwd=spec.cwd,
        ports=[PortMap(container=c, host=h) for c, h in zip(spec.container_ports, ports,
                                                             strict=False)],
        mounts=list(spec.mounts), network=spec.network, memory_mb=limits.memory_mb,
        tty=spec.tty, stdin=spec.stdin or spec.tty, **given)


def check(spec: ContainerSpec, allowed_mounts: Sequence[str] = ()) -> None:
    """What the spec's types cannot say; raises ``ContainerError``."""
    if spec.network in REFUSED_NETWORKS:
        raise ContainerError(f"network {spec.network!r} would share another network; use "
                             "'none' or the name of a podman network")
    if spec.ports and spec.network == "none":
        raise ContainerError("ports need a network: give network as a podman network's name "
                             "(podman's default is 'podman')")
    for name in spec.env:
        if "=" in name:
            raise ContainerError(f"environment name {name!r} contains '='")
    roots = [os.path.realpath(a) for a in allowed_mounts]
    for mount in spec.mounts:
        real = os.path.realpath(mount.source)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
            raise ContainerError(f"mount source {mount.source} is not under a directory this "
                                 "agent allows (its container mounts setting)")
        if "," in real:
            raise ContainerError(f"mount source {mount.source} resolves to a path with ','")


class Podman:
    """One podman installation: its binary, runtime and (optionally) a private store."""

    def __init__(self, binary: str = "podman", runtime: str = "runc",
                 root: str | Path | None = None, runroot: str | Path | None = None,
                 publish: str = "127.0.0.1") -> None:
        self.binary = binary
        self.publish = publish  # the host address container ports are published on
        self.runtime = runtime
        self.root = str(root) if root is not None else None
        self.runroot = str(runroot) if runroot is not None else None

    def base(self) -> list[str]:
        argv = [self.binary, "--runtime", self.runtime]
        if self.root is not None:
            argv += ["--root", self.root]
        if self.runroot is not None:
            argv += ["--runroot", self.runroot]
        return argv

    def unavailable(self) -> str | None:
        """Why this node cannot run containers, or None when it can."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} is not installed on this node (apt-get install podman)"
        if shutil.which(self.runtime) is None and not os.path.isabs(self.runtime):
            return f"the OCI runtime {self.runtime} is not installed (apt-get install runc)"
        return None

    # ------------------------------------------------------------------ start

    def run_argv(self, spec: ContainerSpec, node: str, session: str,
                 allowed_mounts: Sequence[str] = ()) -> list[str]:
        """The ``podman run`` command line for a session's container (validated)."""
        check(spec, allowed_mounts)
        argv = self.base() + [
            "run", "--name", container_name(node, session),
            "--label", f"{LABEL_NODE}={node}", "--label", f"{LABEL_SESSION}={session}",
            "--pull", "never", "--init", "--log-driver", "none", "--http-proxy=false",
            "--security-opt", "no-new-privileges",
            "--network", spec.network,
            "--ulimit", f"nofile={spec.open_files}:{spec.open_files}",
            "--ulimit", f"nproc={spec.processes}:{spec.processes}",
            "--pids-limit", str(spec.pids),
        ]
        if spec.memory_mb is not None:  # swap as large as memory: the limit is the limit
            argv += ["--memory", f"{spec.memory_mb}m", "--memory-swap", f"{spec.memory_mb}m"]
        if spec.cpus is not None:
            argv += ["--cpus", f"{spec.cpus:g}"]
        if spec.cpu_shares is not None:
            argv += ["--cpu-shares", str(spec.cpu_shares)]
        for port in spec.ports:
            host = f"[{self.publish}]" if ":" in self.publish else self.publish
            argv += ["--publish", f"{host}:{port.host}:{port.container}"]
        for mount in spec.mounts:
            argv += ["--mount", f"type=bind,source={os.path.realpath(mount.source)},"
                                f"target={mount.target},readonly=true"]
        for name, value in sorted(spec.env.items()):
            argv += ["--env", f"{name}={value}"]  # always NAME=VALUE: a bare NAME copies ours
        if spec.cwd is not None:
            argv += ["--workdir", spec.cwd]
        if spec.tty:
            argv.append("--tty")
        if spec.stdin or spec.tty:
            argv.append("--interactive")
        argv += ["--", spec.image, *(spec.command or [])]
        return argv

    async def start(self, spec: ContainerSpec, node: str, session: str, *,
                    allowed_mounts: Sequence[str] = (), stdin: int | IO[Any] | None = None,
                    stdout: int | IO[Any] | None = asyncio.subprocess.PIPE,
                    stderr: int | IO[Any] | None = asyncio.subprocess.PIPE,
                    ) -> asyncio.subprocess.Process:
        """Start the container in the foreground: the returned process is the session's
        process (output on its pipes or the given pty, exit status the container's; 125 means
        podman itself failed and said why on stderr)."""
        argv = self.run_argv(spec, node, session, allowed_mounts)
        if not await self.image_exists(spec.image):
            raise ContainerError(f"image {spec.image} is not on this node; images are never "
                                 "pulled: load it with podman load or podman import")
        return await asyncio.create_subprocess_exec(
            *argv, stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, start_new_session=True)

    async def image_exists(self, image: str) -> bool:
        code, _, _ = await self._podman("image", "exists", image)
        return code == 0

    # ------------------------------------------------------------------ poll, stop

    async def state(self, name: str) -> ContainerState | None:
        """The container's state, or None when there is no such container."""
        code, out, err = await self._podman(
            "container", "inspect", "--format",
            '{"name": {{json .Name}}, "status": {{json .State.Status}}, '
            '"exit_code": {{.State.ExitCode}}, "oom_killed": {{.State.OOMKilled}}}', name)
        if code != 0:
            if b"no such" in err.lower():
                return None
            raise ContainerError(f"podman inspect {name}: {err.decode(errors='replace')}")
        return msgspec.json.decode(out.splitlines()[0], type=ContainerState)

    async def poll(self, name: str) -> int | None:
        """None while the container runs, else its exit code (also when it is gone: -1)."""
        found = await self.state(name)
        if found is None:
            return -1
        return None if found.running else found.exit_code

    async def stop(self, name: str, grace: float = 5.0) -> None:
        """SIGTERM to the container, SIGKILL after ``grace`` seconds, then remove it. Returns
        when it is gone; a container that is not there is fine."""
        await self._podman("stop", "--ignore", "--time", str(max(0, int(grace + 0.999))), name,
                           timeout=grace + COMMAND_TIMEOUT)
        await self.remove(name)

    async def remove(self, name: str) -> None:
        code, _, err = await self._podman("rm", "--force", "--ignore", "--time", "0", name)
        if code != 0:
            raise ContainerError(f"podman rm {name}: {err.decode(errors='replace')}")

    async def leftovers(self, node: str) -> list[str]:
        """Names of this node's containers, running or not."""
        code, out, err = await self._podman("ps", "--all", "--filter",
                                            f"label={LABEL_NODE}={node}", "--format",
                                            "{{.Names}}")
        if code != 0:
            raise ContainerError(f"podman ps: {err.decode(errors='replace')}")
        return [line for line in out.decode().splitlines() if line]

    async def remove_leftovers_of(self, nodes: Collection[str]) -> list[str]:
        """Remove every container labelled with one of ``nodes`` (one ``podman ps`` for
        all the nodes of an agent); returns the names removed."""
        code, out, err = await self._podman(
            "ps", "--all", "--filter", f"label={LABEL_NODE}", "--format",
            '{{.Names}} {{index .Labels "' + LABEL_NODE + '"}}')
        if code != 0:
            raise ContainerError(f"podman ps: {err.decode(errors='replace')}")
        gone = []
        for line in out.decode().splitlines():
            name, _, node = line.partition(" ")
            if node in nodes:
                await self.remove(name)
                gone.append(name)
        return gone

    async def remove_leftovers(self, node: str, keep: Sequence[str] = ()) -> list[str]:
        """Remove this node's containers except ``keep`` (what a dead agent left); returns
        the names removed."""
        gone = [name for name in await self.leftovers(node) if name not in keep]
        for name in gone:
            await self.remove(name)
        return gone

    async def _podman(self, *args: str, timeout: float = COMMAND_TIMEOUT,
                      ) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *self.base(), *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ContainerError(f"podman {args[0]} did not finish in {timeout:g}s") from None
        assert proc.returncode is not None
        return proc.returncode, out, err

