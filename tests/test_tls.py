"""TLS built in: ``shoal up --tls`` gives a real fleet over HTTPS and mutual-TLS NATS; a NATS
client without a client certificate, and an HTTPS client without the fleet's CA, are refused
with a clear error. Runs, sessions, terminals and the browser pages work through it: the
``@pytest.mark.tls`` tests of test_run, test_sessions, test_terminal_* and test_browser run a
second time, [tls], against such a fleet (conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from fleet import Fleet, wait_for
from shoal import pki
from shoal.client.aio import Client
from shoal.config import ControllerConfig, NatsConfig
from shoal.controller.server import server_tls
from shoal.errors import ConfigError, ConnectError
from shoal.natsio.natsd import NatsTls, NatsUsers, server_config

SYSTEM_CAS = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("tls") / "home", tls=True).start()
    try:
        yield f
    finally:
        f.stop()


# ---------------------------------------------------------------------- the CA, pure


def test_certificates_chain_to_the_ca_and_name_the_server(tmp_path: Path) -> None:
    ca = pki.make_ca()
    server = pki.make_cert(ca, "server", sans=("127.0.0.1", "localhost"), server=True)
    assert pki.still_good(server.cert, ca.cert, ("127.0.0.1", "localhost"))
    assert not pki.still_good(server.cert, ca.cert, ("nats.example.com",))
    assert not pki.still_good(server.cert, pki.make_ca().cert)  # another CA
    (tmp_path / "ca.pem").write_bytes(ca.cert)
    (tmp_path / "s.pem").write_bytes(server.cert)
    (tmp_path / "s.key").write_bytes(server.key)
    # The standard library accepts the pair, and verifies the server by the CA.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    with pytest.raises(ValueError, match="a server, a client"):
        pki.make_cert(ca, "nothing")
    assert len(pki.spki_sha256(server.cert)) == 44  # base64 of 32 bytes


def test_fleet_files_are_private_and_reused(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    first = pki.fleet_pki(d, pki.server_names(["0.0.0.0"]), ("agent",))
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    again = pki.fleet_pki(d, pki.server_names(["0.0.0.0"]), ("agent",))
    assert again.server_cert.read_bytes() == first.server_cert.read_bytes()
    ca = first.ca.read_bytes()
    wider = pki.fleet_pki(d, pki.server_names(["ctl.example.com"]), ("agent",))
    assert wider.ca.read_bytes() == ca, "the CA clients trust stays"
    assert pki.still_good(wider.server_cert.read_bytes(), ca, ("ctl.example.com",))
    # A servers' certificate from before NATS routes used it to dial (server use only) is
    # made again: a clustered nats-server shows it as a client.
    old = pki.make_cert(pki.Pem(ca, (d / "ca-key.pem").read_bytes()), "server",
                        sans=pki.server_names(), server=True)
    wider.server_cert.write_bytes(old.cert)
    wider.server_key.write_bytes(old.key)
    again = pki.fleet_pki(d, pki.server_names(), ("agent",))
    assert again.server_cert.read_bytes() != old.cert
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    eku = x509.load_pem_x509_certificate(again.server_cert.read_bytes()).extensions \
        .get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_nats_config_verifies_client_certificates() -> None:
    conf = json.loads(server_config(4222, Path("/x"), NatsUsers.generate(),
                                    tls=NatsTls("c.pem", "k.pem", "ca.pem")))
    assert conf["tls"]["verify"] is True and conf["tls"]["ca_file"] == "ca.pem"
    assert {u["user"] for u in conf["accounts"]["SHOAL"]["users"]} == {"controller", "agent"}


def test_half_a_tls_setting_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        server_tls(ControllerConfig(token="t", tls_cert="/c.pem"))
    with pytest.raises(ConfigError, match="cannot load tls_cert"):
        server_tls(ControllerConfig(token="t", tls_cert="/nope.pem", tls_key="/nope.key"))


# ---------------------------------------------------------------------- a fleet on TLS


def test_up_writes_tls_configs(tls_fleet: Fleet) -> None:
    home = tls_fleet.home
    assert tls_fleet.url.startswith("https://") and tls_fleet.services_url.startswith("https://")
    client = tomllib.loads((home / "client.toml").read_text())
    assert client["ca"] == str(tls_fleet.ca)
    for name in ("agent.toml", "controller.toml"):
        nats_cfg = tomllib.loads((home / name).read_text())["nats"]
        assert nats_cfg["url"].startswith("tls://")
        assert nats_cfg["ca"] and nats_cfg["cert"] and nats_cfg["key"], name
    assert "TLS required for client connections" in (home / "nats" / "nats.log").read_text()


def test_agent_and_controller_from_their_configs(tls_fleet: Fleet) -> None:
    """What a real deployment runs: ``shoal agent`` and ``shoal controller`` reading
    agent.toml and controller.toml (their certificates) join the mutual-TLS NATS."""
    tls_fleet.agent("extra-1")
    p, url = tls_fleet.controller()
    try:
        assert url.startswith("https://")
        r = tls_fleet.shoal("--url", url, "run", "-n", "extra-1", "--", "echo", "joined")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "extra-1: joined"
    finally:
        p.terminate()
        p.wait(30)


def test_a_bind_beyond_loopback_without_tls_warns(tls_fleet: Fleet) -> None:
    """Bound to every address (nothing is sent beyond loopback): quiet with its certificate,
    a warning naming tls_cert without one."""
    for env, warned in (({}, False), ({"SHOAL_TLS_CERT": "", "SHOAL_TLS_KEY": ""}, True)):
        p, _ = tls_fleet.controller(env={"SHOAL_HOST": "0.0.0.0", **env})
        p.terminate()
        p.wait(30)
        text = tls_fleet.last_log.read_text()
        assert ("without TLS" in text and "tls_cert" in text) is warned, text


async def test_nats_refuses_a_client_without_a_certificate(tls_fleet: Fleet) -> None:
    # The controllers' credential (node identities: the agents' config has no NATS secret).
    cfg = tomllib.loads((tls_fleet.home / "controller.toml").read_text())["nats"]
    url = cfg["url"]
    good = ssl.create_default_context(cafile=cfg["ca"])
    good.load_cert_chain(cfg["cert"], cfg["key"])
    nc = await nats.connect(url, user_credentials=cfg["creds"], tls=good,
                            connect_timeout=5, allow_reconnect=False)
    assert nc.is_connected  # the same client with its certificate gets in
    await nc.close()
    bare = ssl.create_default_context(cafile=cfg["ca"])  # trusts the server, shows nothing
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises what the socket gave it
        await nats.connect(url, user_credentials=cfg["creds"], tls=bare,
                           connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    wait_for(lambda: "client didn't provide a certificate" in
             (tls_fleet.home / "nats" / "nats.log").read_text())
    # shoal's own connect says what to set.
    from shoal.natsio import bus

    with pytest.raises(ConnectError, match=r"set \[nats\] cert and key"):
        await bus.connect(NatsConfig(url=url, creds=cfg["creds"],
                                     ca=cfg["ca"]), "test")
    with pytest.raises(ConnectError, match=r"certificate verify failed.*\[nats\] ca"):
        await bus.connect(NatsConfig(url=url, creds=cfg["creds"],
                                     cert=cfg["cert"], key=cfg["key"]), "test")
    plain = url.replace("tls://", "nats://")
    with pytest.raises(Exception):  # noqa: B017 - no TLS at all: the server requires it
        await asyncio.wait_for(nats.connect(plain, user_credentials=cfg["creds"],
                                            connect_timeout=5, allow_reconnect=False,
                                            max_reconnect_attempts=0), 20)


def test_a_client_without_the_ca_gets_a_clear_error(tls_fleet: Fleet) -> None:
    no_ca = {"SHOAL_CA": SYSTEM_CAS}  # the system's CAs: they never signed the fleet's cert
    for argv in (("nodes",), ("run", "--all", "--", "true")):
        r = tls_fleet.shoal(*argv, env=no_ca)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert "certificate verify failed" in r.stderr, r.stderr
        assert "client.toml" in r.stderr and "SHOAL_CA" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


async def test_python_client_without_the_ca(tls_fleet: Fleet) -> None:
    async with Client(tls_fleet.url, tls_fleet.token, ca=SYSTEM_CAS) as c:
        with pytest.raises(ConnectError, match="certificate verify failed.*SHOAL_CA"):
            await c.nodes()
    async with Client(tls_fleet.url, tls_fleet.token, ca=str(tls_fleet.ca)) as c:
        assert {n.name for n in await c.nodes()} >= {"node-1", "node-2"}


async def test_login_cookie_is_secure_over_https(tls_fleet: Fleet) -> None:
    ctx = ssl.create_default_context(cafile=str(tls_fleet.ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get(f"{tls_fleet.url}/?token={tls_fleet.token}",
                         allow_redirects=False) as resp:
            assert resp.status == 302
            cookies = resp.headers.getall("Set-Cookie")
    login = next(c for c in cookies if c.startswith("shoal_login="))
    assert "Secure" in login, login


def test_plain_http_to_the_https_port_gets_nothing(tls_fleet: Fleet) -> None:
    r = tls_fleet.shoal("--url", tls_fleet.url.replace("https://", "http://"), "nodes")
    assert r.returncode != 0


# ---------------------------------------------------------------------- the browser


def test_browser_without_the_pin_refuses_the_certificate(tls_fleet: Fleet) -> None:
    """The control for test_browser.py's [tls] tests (their chromium trusts the test CA's
    server key by its pin): without the pin, the same browser does not load the page."""
    from playwright.sync_api import sync_playwright

    from test_browser import ARGS, CHROMIUM

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            with pytest.raises(Exception, match="ERR_CERT"):
                page.goto(f"{tls_fleet.url}/?token={tls_fleet.token}")
        finally:
            browser.close()


def test_shoal_home_keys_are_not_readable_by_others(tls_fleet: Fleet) -> None:
    for f in (tls_fleet.home / "tls").iterdir():
        assert not os.stat(f).st_mode & 0o077, f


# ---------------------------------------------------------------------- a TLS NATS cluster


async def test_a_tls_cluster_routes_over_tls_only(tmp_path: Path) -> None:
    """``shoal up --tls --nats-cluster 3``: the routes between the servers are mutual TLS
    with the fleet's certificates; the cluster forms (a replicated bucket takes writes on
    a meta leader's say) and a plain-text route connection is refused, even with the route
    password."""
    import socket

    from shoal.config import ControllerConfig, load
    from shoal.natsio import bus

    f = Fleet(tmp_path / "home", agents=1, extra_args=("--nats-cluster", "3"), tls=True).start()
    try:
        confs = [json.loads((d / "nats.conf").read_text())
                 for d in sorted((f.home / "nats-cluster").iterdir()) if d.is_dir()]
        assert len(confs) == 3
        for conf in confs:
            assert conf["cluster"]["tls"]["verify"] is True
            assert conf["cluster"]["tls"]["ca_file"] == str(f.ca)
        r = f.shoal("run", "-n", "node-1", "--", "echo", "through-the-cluster")
        assert (r.returncode, r.stdout) == (0, "node-1: through-the-cluster\n"), r.stderr
        nc = await bus.connect(load(ControllerConfig, f.home / "controller.toml").nats, "test")
        try:
            js = nc.jetstream()
            from nats.js.api import KeyValueConfig

            kv = await js.create_key_value(config=KeyValueConfig(bucket="tls-r3", replicas=3))
            await kv.put("k", b"over routes")
            assert (await kv.get("k")).value == b"over routes"
            for _ in range(100):  # the followers catch up on their own time
                info = await js.stream_info("KV_tls-r3")
                assert info.cluster is not None and info.cluster.leader
                assert len(info.cluster.replicas or []) == 2
                if all(p.current for p in info.cluster.replicas or []):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"the replicas never caught up: {info.cluster}")
        finally:
            await nc.close()
        # A route dialled in plain text, with the right route user and password.
        cluster = confs[0]["cluster"]
        user, password = cluster["authorization"]["user"], cluster["authorization"]["password"]
        with socket.create_connection(("127.0.0.1", cluster["port"]), timeout=20) as s:
            s.sendall(b'CONNECT {"user":"%s","pass":"%s","name":"rogue","cluster":"%s"}\r\n'
                      b'PING\r\n' % (user.encode(), password.encode(), cluster["name"].encode()))
            got = b""
            try:
                while chunk := s.recv(4096):
                    got += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        # The server speaks TLS first on its routes: no INFO, no PONG in plain text.
        assert b"INFO" not in got and b"PONG" not in got, got
        wait_for(lambda: "Router connection closed: TLS Handshake Failure" in
                 (f.home / "nats-cluster" / "n1" / "nats.log").read_text(), timeout=20)
        assert "rogue" not in (f.shoal("nodes").stdout)
    finally:
        f.stop()
