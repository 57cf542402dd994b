"""The failure model's NATS row: restart the NATS server under a running fleet. Sessions keep
running, the output they wrote meanwhile arrives afterwards, byte for byte, and the fleet
goes on working."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from fleet import Fleet, wait_for
from shoal.natsio.natsd import NatsServer, NatsUsers, free_port


def _health(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url + "/healthz", timeout=5).status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_a_nats_restart_loses_no_output(tmp_path: Path) -> None:
    users = NatsUsers.generate()
    server = NatsServer(tmp_path / "nats", users, port=free_port())
    server.start()
    fleet = Fleet(tmp_path / "home", agents=1, extra_args=("--nats", server.url))
    fleet.env.update(SHOAL_NATS_USER="controller", SHOAL_NATS_PASSWORD=users.controller_password)
    try:
        fleet.start()
        script = "i=1; while [ $i -le 80 ]; do echo line-$i; i=$((i+1)); sleep 0.05; done"
        sid = fleet.shoal("session", "create", "--shell", script).stdout.strip()
        wait_for(lambda: fleet.shoal("logs", sid).stdout.count("\n") >= 10)
        server.stop()
        wait_for(lambda: _health(fleet.url) == 503, timeout=10)  # a balancer would notice
        time.sleep(1.0)  # the session writes on while NATS is away
        server.start()
        wait_for(lambda: _health(fleet.url) == 200, timeout=30)

        def finished() -> bool:
            r = fleet.shoal("session", "show", sid)
            return r.returncode == 0 and json.loads(r.stdout)["state"] == "exited"

        wait_for(finished, timeout=60, interval=0.5)
        assert fleet.shoal("logs", sid).stdout.split() == [f"line-{i}" for i in range(1, 81)]
        # And the fleet still works: a new session is placed and runs.
        r = fleet.shoal("session", "create", "--", "echo", "after")
        assert r.returncode == 0, r.stderr
        again = r.stdout.strip()
        wait_for(lambda: fleet.shoal("logs", again).stdout == "after\n", timeout=30)
    finally:
        fleet.stop()
        server.stop()
