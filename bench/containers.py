"""A private podman store holding a busybox image built offline (no registry is reachable
here), and an agent using it, for benches that run container sessions: the image
tests/test_containers.py builds. (`shoal up`'s own agents take no SHOAL_* settings from the
environment, so the store is given to an agent of its own that joins the bench fleet.)"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import ShoalFleet, _wait_for, ready_nodes
from bench.proc import stop_process
from shoal.agent.containers import Podman

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: one static binary, no libraries to copy
IMAGE = "localhost/shoal-bench-busybox:1"
NODE = "cnode-1"  # the agent holding the image


def rootfs_tar(dirs: tuple[str, ...] = (), files: dict[str, bytes] | None = None) -> bytes:
    """/bin/busybox, a link per applet and the usual empty directories, plus ``dirs`` and
    ``files`` (path -> content) for what a test serves from the image."""
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", *dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for name in applets:
            if name != "busybox":
                info = tarfile.TarInfo(f"bin/{name}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        for path, content in (files or {}).items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@contextmanager
def busybox_store() -> Iterator[tuple[dict[str, str], str]]:
    """Yields (the agent environment naming the store, "") or ({}, why there is none).
    Removes the store's containers, images and directory on exit."""
    pod = Podman()
    problem = pod.unavailable()
    if problem is None and not os.path.exists(BUSYBOX):
        problem = f"{BUSYBOX} is missing (apt-get install busybox-static)"
    if problem is not None:
        yield {}, problem
        return
    store = Path(tempfile.mkdtemp(prefix="shoal-bpod-"))  # short: conmon's socket paths
    pod = Podman(root=store / "root", runroot=store / "run")
    try:
        try:
            subprocess.run([*pod.base(), "import", "-", IMAGE], input=rootfs_tar(),
                           check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            yield {}, f"podman import failed: {exc} {err.decode(errors='replace')[-200:]}"
            return
        assert pod.root is not None and pod.runroot is not None
        yield {"SHOAL_PODMAN_ROOT": pod.root, "SHOAL_PODMAN_RUNROOT": pod.runroot}, ""
    finally:
        for what in (["rm", "--all", "--force", "--time", "0"], ["rmi", "--all", "--force"]):
            subprocess.run([*pod.base(), *what], capture_output=True, timeout=120)
        shutil.rmtree(store, ignore_errors=True)


@contextmanager
def container_agent(fleet: ShoalFleet, podman_env: dict[str, str], root: Path,
                    timeout_s: float = 60.0) -> Iterator[str]:
    """`shoal agent --name cnode-1` on the bench fleet with the store in ``podman_env``;
    yields the node's name once it is ready, stops it on exit."""
    env = dict(fleet.env, **podman_env)
    log_ = root / "shoal-agent-containers.log"
    with log_.open("wb") as out:
        proc = subprocess.Popen([str(fleet.shoal), "agent", "--name", NODE, "--capacity", "50"],
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: ready_nodes(fleet.shoal, env, prefix=NODE) >= 1, timeout_s,
                  f"shoal agent --name {NODE}", proc, log_)
        yield NODE
    finally:
        stop_process(proc)
