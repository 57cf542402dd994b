"""A real local fleet for tests: ``shoal up`` (private nats-server, controller, agents) and
extra ``shoal agent`` processes, all driven through the real command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    import ssl

    import aiohttp

    from shoal.client.aio import Client

BIN = Path(sys.executable).parent
SHOAL = str(BIN / "shoal")
TLS = "tls"  # the parameter of a test's TLS variant (conftest.py: the ``tls`` marker)


class Fleet:
    def __init__(self, home: Path, agents: int = 2, extra_args: tuple[str, ...] = (),
                 tls: bool = False, pki: Path | None = None) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
        self.env["SHOAL_HOME"] = str(home)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.agents = agents
        self.extra_args = (*extra_args, "--tls") if tls else extra_args
        self.ca = home / "tls" / "ca.pem" if tls else None  # `shoal up --tls` makes it
        self.pki = pki  # a tls/ to start from (up reuses it): conftest's shared test CA
        self.up: subprocess.Popen[str] | None = None
        self.url = ""
        self.services_url = ""  # the services listener: service NAME is at /s/NAME/
        self.token = ""
        self.procs: list[subprocess.Popen[str]] = []
        self.log = home / "up.log"
        self.last_log = self.log  # the log of the last extra controller started

    def start(self, timeout: float = 30.0) -> Fleet:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.pki is not None and not (self.home / "tls").exists():
            import shutil

            shutil.copytree(self.pki, self.home / "tls")  # the modes (0600) come along
        log = open(self.log, "w")  # noqa: SIM115 - the child owns it
        self.up = subprocess.Popen(
            [SHOAL, "up", "--agents", str(self.agents), "--port", "0", *self.extra_args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            found = re.search(r"(https?://127\.0\.0\.1:\d+)/\?token=(\S+)", text)
            if found and "Ctrl-C stops everything." in text:  # the last line printed
                self.url, self.token = found.group(1), found.group(2)
                services = re.search(r"services: +(https?://\S+)/s/NAME/", text)
                self.services_url = services.group(1) if services else self.url
                break
            if self.up.poll() is not None:
                raise RuntimeError(f"shoal up exited:\n{text}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"shoal up did not come up:\n{self.log.read_text()}")
        if self.agents:
            try:
                self.wait_nodes([f"node-{i}" for i in range(1, self.agents + 1)])
            except BaseException:  # the caller never gets a fleet to stop: stop it here
                self.stop()
                raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(30)
            except subprocess.TimeoutExpired:
                self._slow_stop()
        self.drop_netpolicy_tables()

    def _slow_stop(self) -> None:
        """A stop past 30 s (a few seconds is usual): its stacks go into its log, and it
        gets 30 s more; the log is shown if that is not enough."""
        assert self.up is not None
        self.up.send_signal(signal.SIGUSR1)
        try:
            self.up.wait(30)
        except subprocess.TimeoutExpired:
            self.up.kill()
            raise AssertionError("shoal up did not stop in 60 s; its log, with its stacks:\n"
                                 f"{self.log.read_text()[-20000:]}") from None
        print(f"shoal up took 30-60 s to stop; its log:\n{self.log.read_text()[-20000:]}",
              file=sys.stderr)

    def drop_netpolicy_tables(self) -> None:
        """Network-policy tables of this fleet's agents that a test SIGKILLed (a crashed
        agent's rules stay until it starts again, and these never will)."""
        import shutil

        from shoal.agent.netpolicy import orphans

        if os.geteuid() != 0 or shutil.which("nft") is None:
            return
        listing = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
        home = str(self.home.resolve())
        for table in orphans(listing.stdout, lambda d: not d.startswith(home)):
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)

    def client(self, **kw: Any) -> Client:
        """A ``shoal.client.aio.Client`` for this fleet (verifying its CA when on TLS)."""
        from shoal.client.aio import Client

        return Client(self.url, self.token, ca=str(self.ca or ""), **kw)

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What aiohttp's ``ssl=`` takes for this fleet: its CA on TLS, else the default."""
        import ssl

        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else True

    def http(self, **kw: Any) -> aiohttp.ClientSession:
        """An ``aiohttp.ClientSession`` that trusts this fleet's CA."""
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl_context()), **kw)

    def shoal(self, *args: str, input: str | bytes | None = None, timeout: float = 60,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        text = not isinstance(input, bytes)
        return subprocess.run([SHOAL, *args], input=input, capture_output=True, text=text,
                              env={**self.env, **(env or {})}, timeout=timeout)

    def spawn(self, *args: str, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen([SHOAL, *args], env={**self.env, **(env or {})}, text=True,
                             **kwargs)
        self.procs.append(p)
        return p

    def agent(self, name: str, *args: str, env: dict[str, str] | None = None,
              wait: bool = True) -> subprocess.Popen[str]:
        log = open(self.home / f"agent-{name}.log", "w")  # noqa: SIM115
        p = self.spawn("agent", "--name", name, *args, env=env, stdout=log,
                       stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if wait:
            self.wait_nodes([name])
        return p

    def controller(self, port: int = 0, timeout: float = 20,
                   env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
        """Start one more controller process; returns it and its URL (its log: ``last_log``)."""
        log_path = self.home / f"controller-{time.monotonic_ns()}.log"
        log = open(log_path, "w")  # noqa: SIM115
        # Services on any free port: the default (this port + 1) may be another test's.
        p = self.spawn("controller", "--port", str(port), stdout=log, stderr=subprocess.STDOUT,
                       env={"SHOAL_SERVICES_PORT": "0", **(env or {})})
        log.close()
        self.last_log = log_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"shoal controller on (https?://\S+)", log_path.read_text())
            if found:
                return p, found.group(1)
            if p.poll() is not None:
                raise RuntimeError(f"controller exited: {log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"controller did not start: {log_path.read_text()}")

    def agent_nats(self, node: str = "node-1") -> dict[str, Any]:
        """What ``nats.connect`` needs to act as one of this fleet's agents: ``node``'s own
        credential (node identities, `shoal up`'s default), else the shared agent user."""
        from shoal.config import AgentConfig, load

        cfg = load(AgentConfig, self.home / "agent.toml").nats
        if cfg.password:
            return {"user": cfg.user, "password": cfg.password, "inbox_prefix": "_INBOX_AGENT"}
        creds = self.home / "agent-state" / "identity" / f"{node}.creds"
        return {"user_credentials": str(creds), "inbox_prefix": f"_INBOX_AGENT.{node}"}

    def nodes(self) -> dict[str, dict[str, Any]]:
        r = self.shoal("nodes", "--json")
        assert r.returncode == 0, r.stderr
        return {n["name"]: n for n in json.loads(r.stdout)}

    def wait_nodes(self, names: list[str], state: str = "ready", timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if all(nodes.get(n, {}).get("state") == state for n in names):
                return
            time.sleep(0.1)
        raise AssertionError(f"nodes {names} not {state}: {self.nodes()}")


def processes_with_env(key: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has key=value (how we find a run's processes)."""
    found = []
    for p in psutil.process_iter(["cmdline", "name", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(key) == value:
                found.append(p)
        except psutil.Error:
            continue
    return found


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped: kill() only queues
    the signal, and a busy multi-threaded server (nats-server) can still answer a PING
    that arrives before the last of its threads gets there."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        try:
            return all(t.status() == psutil.STATUS_STOPPED
                       for t in (psutil.Process(th.id) for th in psutil.Process(pid).threads()))
        except psutil.NoSuchProcess:
            return False
    wait_for(all_stopped, timeout=timeout, interval=0.005)


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s")


class Terminal:
    """A command run on a real pseudo-terminal, as a person at a terminal would run it."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 30,
                 cols: int = 100) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self._fcntl, self._struct, self._termios = fcntl, struct, termios
        self.master, slave = pty.openpty()
        self.resize(rows, cols, fd=slave)

        def ctty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     preexec_fn=ctty)
        os.close(slave)
        self.seen = bytearray()

    def resize(self, rows: int, cols: int, fd: int | None = None) -> None:
        self._fcntl.ioctl(self.master if fd is None else fd, self._termios.TIOCSWINSZ,
                          self._struct.pack("HHHH", rows, cols, 0, 0))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, token: bytes, timeout: float = 15) -> bytes:
        import select

        deadline = time.monotonic() + timeout
        while token not in self.seen:
            assert time.monotonic() < deadline, f"never saw {token!r} in {bytes(self.seen)!r}"
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen.extend(os.read(self.master, 4096))
                except OSError:
                    break
        return bytes(self.seen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


async def wait_running(client: Any, sid: str) -> Any:
    """Until the session runs (its record), via a ``shoal.client.aio.Client``."""
    import asyncio

    for _ in range(200):
        r = await client.session(sid)
        if r.state == "running":
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sid} never ran: {r}")
