"""A full disk: the JetStream store on a small tmpfs the test mounts, filled by a session's
output. What must hold while it is full: ``session kill --wait`` completes, the agent's log
says why output is not stored, ``session rm`` refuses with what to do (nats-server keeps the
stream's write error until it restarts) and removes nothing, then succeeds after a
nats-server restart and gives the space back; a healthy session stays ``running``
throughout and its held output is stored again afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from faultkit import NatsFleet, counter
from fleet import wait_for
from shoal.natsio.natsd import NatsServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounts a tmpfs")

STORE = 48 << 20  # the tmpfs under the JetStream store


class SmallDiskServer(NatsServer):
    """nats-server believing it has far more room than its filesystem (a store_dir whose
    disk fills up under it, as on a shared disk): the streams are made, writes then fail."""

    def config(self) -> str:
        conf = msgspec.json.decode(super().config())
        conf["jetstream"]["max_file_store"] = 64 << 30
        return msgspec.json.encode(conf).decode()


@pytest.fixture
def full(tmp_path: Path) -> Iterator[NatsFleet]:
    store = tmp_path / "nats" / "jetstream"
    store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE}", "tmpfs", str(store)],
                   check=True)
    try:
        nf = NatsFleet(tmp_path, agents=1)
        nf.server = SmallDiskServer(tmp_path / "nats", nf.users, port=nf.server.port)
        with nf:
            yield nf
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _state(nf: NatsFleet, sid: str) -> str:
    r = nf.fleet.shoal("session", "show", sid)
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["state"])


def test_a_full_store_is_survived(full: NatsFleet, tmp_path: Path) -> None:
    fleet = full.fleet
    store = tmp_path / "nats" / "jetstream"
    truth = tmp_path / "truth"
    r = fleet.shoal("session", "create", "--shell", counter(truth, 100000, 0.5))
    assert r.returncode == 0, r.stderr
    healthy = r.stdout.strip()
    wait_for(lambda: _state(full, healthy) == "running")
    r = fleet.shoal("session", "create", "--shell",
                    "head -c 200000000 /dev/urandom | base64; sleep 1000")
    assert r.returncode == 0, r.stderr
    filler = r.stdout.strip()
    wait_for(lambda: _free(store) < 1 << 20, timeout=30)
    log = fleet.home / "up.log"
    wait_for(lambda: "the JetStream store may be full" in log.read_text(), timeout=20)
    # A kill does not wait on output that cannot be stored (before: --wait never ended).
    r = fleet.shoal("session", "kill", "--wait", filler, timeout=40)
    assert r.returncode == 0, r.stderr
    # nats-server keeps the output stream's write error until it restarts: `rm` says so,
    # and keeps the record so it can be run again.
    r = fleet.shoal("session", "rm", filler, timeout=30)
    assert r.returncode != 0
    assert "restart nats-server" in r.stderr, r.stderr
    assert _state(full, filler) == "killed"
    assert _state(full, healthy) == "running"  # its heartbeats were stored meanwhile
    full.kill_nats()
    full.server.start()
    before = _free(store)
    r = wait_for(lambda: (r := fleet.shoal("session", "rm", filler, timeout=30)).returncode == 0
                 and r, timeout=20)
    wait_for(lambda: _free(store) > before + (16 << 20), timeout=10)
    assert fleet.shoal("session", "show", filler).returncode != 0
    assert _state(full, healthy) == "running"
    # Its output, held while the store was full, is stored again (what it wrote last).
    last = truth.read_text().splitlines()[-1]
    wait_for(lambda: last in fleet.shoal("session", "logs", healthy).stdout, timeout=15)


def test_heartbeats_that_cannot_be_stored_do_not_lose_sessions(full: NatsFleet,
                                                                tmp_path: Path) -> None:
    """The disk filled by another file: every stream's writes fail, heartbeats included.
    A controller that sees no node beat cannot tell the fleet from the bus: it must not
    declare the node down and its healthy session lost."""
    fleet = full.fleet
    store = tmp_path / "nats" / "jetstream"
    truth = tmp_path / "truth"
    r = fleet.shoal("session", "create", "--shell", counter(truth, 100000, 0.5))
    assert r.returncode == 0, r.stderr
    healthy = r.stdout.strip()
    wait_for(lambda: _state(full, healthy) == "running")
    subprocess.run(["dd", "if=/dev/zero", f"of={store / 'filler'}", "bs=1M"],
                   capture_output=True)
    filled = time.monotonic()
    assert _free(store) < 64 << 10
    log = fleet.home / "up.log"
    wait_for(lambda: "heartbeat: 1 of 1 puts failed: JetStream did not acknowledge"
             in log.read_text(), timeout=20)
    while time.monotonic() - filled < 25:  # past PAUSE_VERDICT TTLs (6 s each) unbeaten
        assert _state(full, healthy) == "running"
        time.sleep(1)
    # Recovery: space back, nats-server restarted; the node beats again, nothing was lost.
    (store / "filler").unlink()
    full.kill_nats()
    full.server.start()
    fleet.wait_nodes(["node-1"], timeout=20)
    assert _state(full, healthy) == "running"
