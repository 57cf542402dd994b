"""The podman driver with real podman and runc: an image built here, offline, from Debian's
busybox-static (``podman import`` of a root file system tarball) in a private image store."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.containers import rootfs_tar

from shoal.agent.containers import (
    ContainerError,
    ContainerSpec,
    Mount,
    Podman,
    PortMap,
    check,
    container_name,
)
from shoal.config import AgentConfig

BUSYBOX = "/bin/busybox"
IMAGE = "localhost/shoal-test-busybox:1"
NODE = f"ctest{os.getpid()}"
needs_podman = pytest.mark.skipif(
    shutil.which("podman") is None or shutil.which("runc") is None
    or not os.path.exists(BUSYBOX),
    reason="needs podman, runc and busybox-static (scripts/test-deps.sh installs them)")


def _rootfs_tar() -> bytes:
    """The bench's busybox image with a web root and a data directory."""
    return rootfs_tar(("www", "data"), {"www/index.html": b"hello from a container\n"})


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    store = Path(tempfile.mkdtemp(prefix="shoal-podman-"))  # short: conmon's socket paths
    pod = Podman(runtime="runc", root=store / "root", runroot=store / "run")
    try:
        subprocess.run([*pod.base(), "import", "-", IMAGE], input=_rootfs_tar(), check=True,
                       capture_output=True, timeout=120)
        yield pod
    finally:
        subprocess.run([*pod.base(), "rm", "--all", "--force", "--time", "0"],
                       capture_output=True, timeout=120)
        subprocess.run([*pod.base(), "rmi", "--all", "--force"], capture_output=True,
                       timeout=120)
        shutil.rmtree(store, ignore_errors=True)


async def run_to_end(pod: Podman, spec: ContainerSpec, session: str,
                     allowed: tuple[str, ...] = ()) -> tuple[int, bytes, bytes]:
    proc = await pod.start(spec, NODE, session, allowed_mounts=allowed)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await pod.remove(container_name(NODE, session))
    assert proc.returncode is not None
    return proc.returncode, out, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _served(url: str) -> bytes:
    """What ``url`` serves once something listens there (a container takes a moment)."""
    for _ in range(200):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return bytes(r.read())
        except OSError:
            await asyncio.sleep(0.1)
    return b""


# ---------------------------------------------------------------------- with podman


@needs_podman
async def test_output_is_byte_exact(podman: Podman, tmp_path: Path) -> None:
    blob = bytes(range(256)) + os.urandom(500_000) + b"\r\n\x00no newline"
    (tmp_path / "blob").write_bytes(blob)
    spec = ContainerSpec(image=IMAGE, command=["sh", "-c", "cat /data/blob; echo err >&2; exit 7"],
                         mounts=[Mount(source=str(tmp_path), target="/data")])
    code, out, err = await run_to_end(podman, spec, "bytes", allowed=(str(tmp_path),))
    assert (code, err) == (7, b"err\n")
    assert out == blob


@needs_podman
async def test_mounts_are_read_only(podman: Podman, tmp_path: Path) -> None:
    spec = ContainerSpec(image=IMAGE, command=["sh", "-c", "echo x > /data/new; echo rc=$?"],
                         mounts=[Mount(source=str(tmp_path), target="/data")])
    code, out, _ = await run_to_end(podman, spec, "ro", allowed=(str(tmp_path),))
    assert out.strip().endswith(b"rc=1"), out
    assert list(tmp_path.iterdir()) == []


@needs_podman
async def test_memory_limit_bites(podman: Podman) -> None:
    grow = ["sh", "-c", 'x=$(head -c 100000000 /dev/zero | tr "\\0" a); echo survived ${#x}']
    code, out, _ = await run_to_end(podman, ContainerSpec(image=IMAGE, command=grow,
                                                          memory_mb=32), "mem-small")
    assert code == 128 + signal.SIGKILL and b"survived" not in out
    # The same with room to spare: it was the limit, not the script.
    code, out, _ = await run_to_end(podman, ContainerSpec(image=IMAGE, command=grow,
                                                          memory_mb=512), "mem-big")
    assert (code, out) == (0, b"survived 100000000\n")


class Listener:
    """A TCP port on the host's loopback that counts connections and closes each one."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


@needs_podman
async def test_network_none_cannot_reach_a_host_port(podman: Podman) -> None:
    listener = Listener()
    probe = f"nc 127.0.0.1 {listener.port} </dev/null; echo rc=$?; cat /proc/net/dev"
    try:
        code, out, _ = await run_to_end(
            podman, ContainerSpec(image=IMAGE, command=["sh", "-c", probe]), "net-none")
        assert b"rc=1" in out, out
        interfaces = [line.split(b":")[0].strip() for line in out.splitlines()
                      if b":" in line and b"|" not in line and not line.startswith(b"nc")]
        assert interfaces == [b"lo"], out
        assert listener.accepted == 0
        # The probe does reach the port from the host's network (so the checks above can fail).
        shared = await asyncio.to_thread(subprocess.run, [
            *podman.base(), "run", "--rm", "--network", "host", "--ulimit", "nofile=64:64",
            "--ulimit", "nproc=64:64", IMAGE, "sh", "-c", probe],
            capture_output=True, timeout=60)
        assert b"rc=0" in shared.stdout, shared
        assert listener.accepted == 1
    finally:
        listener.close()


@needs_podman
async def test_port_mapped_to_a_host_port(podman: Podman) -> None:
    host_port = _free_port()
    spec = ContainerSpec(image=IMAGE, command=["httpd", "-f", "-p", "80", "-h", "/www"],
                         network="podman", ports=[PortMap(container=80, host=host_port)])
    name = container_name(NODE, "web")
    proc = await podman.start(spec, NODE, "web")
    try:
        assert await _served(f"http://127.0.0.1:{host_port}/") == b"hello from a container\n"
        assert await podman.poll(name) is None  # running
    finally:
        await podman.stop(name, grace=5)
        await asyncio.wait_for(proc.wait(), 30)
    assert await podman.state(name) is None
    assert await podman.poll(name) == -1


@needs_podman
async def test_ports_are_published_on_the_configured_address_only(podman: Podman) -> None:
    """A node of a multi-machine fleet publishes container ports on its own address (here
    127.0.0.2, a second loopback address), and on that address alone."""
    host_port = _free_port()
    pod = Podman(podman.binary, podman.runtime, podman.root, podman.runroot, "127.0.0.2")
    spec = ContainerSpec(image=IMAGE, command=["httpd", "-f", "-p", "80", "-h", "/www"],
                         network="podman", ports=[PortMap(container=80, host=host_port)])
    assert f"127.0.0.2:{host_port}:80" in pod.run_argv(spec, NODE, "pub")
    name = container_name(NODE, "pub")
    proc = await pod.start(spec, NODE, "pub")
    try:
        assert await _served(f"http://127.0.0.2:{host_port}/") == b"hello from a container\n"
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", host_port))
    finally:
        await pod.stop(name, grace=5)
        await asyncio.wait_for(proc.wait(), 30)


def test_a_publish_address_that_is_not_an_address_is_refused() -> None:
    with pytest.raises(ValueError, match="container_publish: 'node-1.example' is not an IP"):
        AgentConfig(container_publish="node-1.example")


@needs_podman
async def test_limits_reach_the_container(podman: Podman) -> None:
    spec = ContainerSpec(image=IMAGE, pids=20, open_files=100, processes=300, command=[
        "sh", "-c", "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max;"
                    " ulimit -n; ulimit -u"])
    code, out, err = await run_to_end(podman, spec, "limits")
    assert (code, out) == (0, b"20\n100\n300\n"), err


@needs_podman
async def test_a_killed_agent_leaves_a_container_the_next_one_removes(podman: Podman) -> None:
    keep, lost = container_name(NODE, "keep"), container_name(NODE, "lost")
    procs = [await podman.start(ContainerSpec(image=IMAGE, command=["sleep", "1000"]), NODE, s)
             for s in ("keep", "lost")]
    try:
        for _ in range(200):
            states = [await podman.state(n) for n in (keep, lost)]
            if all(s is not None and s.status == "running" for s in states):
                break
            await asyncio.sleep(0.05)
        # SIGKILL to the podman process (what an agent's SIGKILL does): the container lives on.
        os.killpg(procs[1].pid, signal.SIGKILL)
        await procs[1].wait()
        assert await podman.poll(lost) is None
        assert sorted(await podman.leftovers(NODE)) == sorted([keep, lost])
        assert await podman.remove_leftovers(NODE, keep=[keep]) == [lost]
        assert await podman.state(lost) is None
        assert await podman.leftovers(NODE) == [keep]
    finally:
        await podman.stop(keep, grace=5)
        for p in procs:
            await asyncio.wait_for(p.wait(), 30)
    assert await podman.leftovers(NODE) == []


@needs_podman
async def test_stop_ends_a_container_at_once_and_twice_is_fine(podman: Podman) -> None:
    name = container_name(NODE, "stop")
    proc = await podman.start(ContainerSpec(image=IMAGE, command=["sleep", "1000"]), NODE, "stop")
    for _ in range(200):
        state = await podman.state(name)
        if state is not None and state.status == "running":
            break
        await asyncio.sleep(0.05)
    await podman.stop(name, grace=30)  # --init passes SIGTERM to sleep: no 30 s wait needed
    assert await asyncio.wait_for(proc.wait(), 30) == 128 + signal.SIGTERM
    await podman.stop(name)
    assert await podman.state(name) is None


@needs_podman
async def test_an_image_not_on_the_node_is_a_clear_error(podman: Podman) -> None:
    with pytest.raises(ContainerError, match="never pulled"):
        await podman.start(ContainerSpec(image="localhost/no-such-image:1"), NODE, "noimage")


# ---------------------------------------------------------------------- without podman


def test_unavailable_says_what_is_missing() -> None:
    assert "not installed" in (Podman(binary="/nonexistent/podman").unavailable() or "")
    if shutil.which("podman"):
        assert "runtime" in (Podman(runtime="no-such-runtime").unavailable() or "")


def test_check_refuses_what_would_escape(tmp_path: Path) -> None:
    allowed = tmp_path / "share"
    allowed.mkdir()
    (allowed / "etc").symlink_to("/etc")
    for network in ("host", "slirp4netns", "pasta"):
        with pytest.raises(ContainerError, match="share"):
            check(ContainerSpec(image=IMAGE, network=network))
    with pytest.raises(ContainerError, match="ports need a network"):
        check(ContainerSpec(image=IMAGE, ports=[PortMap(container=80, host=8080)]))
    with pytest.raises(ContainerError, match="not under"):
        check(ContainerSpec(image=IMAGE, mounts=[Mount(source="/etc", target="/x")]),
              [str(allowed)])
    with pytest.raises(ContainerError, match="not under"):  # a symlink out of the allowed dir
        check(ContainerSpec(image=IMAGE, mounts=[Mount(source=str(allowed / "etc"),
                                                       target="/x")]), [str(allowed)])
    with pytest.raises(ContainerError, match="not under"):  # a sibling with the same prefix
        check(ContainerSpec(image=IMAGE, mounts=[Mount(source=str(allowed) + "2",
                                                       target="/x")]), [str(allowed)])
    with pytest.raises(ContainerError, match="'='"):
        check(ContainerSpec(image=IMAGE, env={"A=B": "c"}))
    check(ContainerSpec(image=IMAGE, mounts=[Mount(source=str(allowed), target="/x")]),
          [str(allowed)])


def test_run_argv_is_explicit() -> None:
    argv = Podman(runtime="runc").run_argv(
        ContainerSpec(image=IMAGE, command=["sh", "-c", "echo $X"], env={"X": "1 2"},
                      memory_mb=64, pids=10, open_files=100, processes=50), "n1", "s1")
    joined = " ".join(argv)
    for part in ("--runtime runc", "--network none", "--pids-limit 10", "--memory 64m",
                 "--ulimit nofile=100:100", "--ulimit nproc=50:50", "--pull never",
                 "--label io.shoal.node=n1", "--label io.shoal.session=s1",
                 "--name shoal-n1-s1"):
        assert part in joined, part
    assert argv[-4:] == [IMAGE, "sh", "-c", "echo $X"]  # argv as is, after --
    assert argv[argv.index("--env") + 1] == "X=1 2"


@needs_podman
async def test_tty_gets_the_terminal_size_and_a_resize(podman: Podman) -> None:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    spec = ContainerSpec(image=IMAGE, tty=True, command=[
        "sh", "-c", "stty size; trap 'stty size; exit 0' WINCH; echo ready; "
                    "while :; do sleep 0.1; done"])
    proc = await podman.start(spec, NODE, "tty", stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen = bytearray()

    async def until(token: bytes) -> None:
        loop = asyncio.get_running_loop()
        while token not in seen:
            seen.extend(await loop.run_in_executor(None, os.read, master, 4096))

    try:
        await asyncio.wait_for(until(b"ready"), 30)
        assert b"33 111" in seen
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.killpg(proc.pid, signal.SIGWINCH)  # as the kernel does when it is the ctty
        await asyncio.wait_for(until(b"40 120"), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        await podman.stop(container_name(NODE, "tty"), grace=1)
        os.close(master)
