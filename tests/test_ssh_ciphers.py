"""The ssh leg's cipher order: AES-GCM first by default, ~/.ssh/config's Ciphers honoured."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from shoal.ssh.connect import Connector, cipher_order
from shoal.ssh.targets import Inventory, SshTarget


async def options(tmp_path: Path, config: str) -> asyncssh.SSHClientConnectionOptions:
    path = tmp_path / "config"
    path.write_text(config)
    return await asyncssh.SSHClientConnectionOptions.construct(host="h1", config=[path])


async def test_default_offers_the_same_ciphers_aes_gcm_first(tmp_path: Path) -> None:
    opts = await options(tmp_path, "Host h1\n  Port 2222\n")
    ordered = cipher_order(opts)["encryption_algs"]
    assert ordered[:2] == ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com"]
    # a reorder only: nothing added, nothing dropped
    assert sorted(ordered) == sorted(a.decode() for a in opts.encryption_algs)


async def test_config_ciphers_are_left_alone(tmp_path: Path) -> None:
    opts = await options(tmp_path, "Host h1\n  Ciphers chacha20-poly1305@openssh.com\n")
    assert cipher_order(opts) == {}
    assert opts.encryption_algs == [b"chacha20-poly1305@openssh.com"]


async def test_the_users_ssh_config_is_read_for_each_host(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the options a connection is made with, not a config passed by hand: a Ciphers line in
    # ~/.ssh/config must reach cipher_order
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host h1\n  Ciphers aes128-ctr\n  Port 2200\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    opts = await Connector(Inventory(), 5).options(SshTarget(name="h1", address="h1"))
    assert opts.port == 2200
    assert cipher_order(opts) == {}
    assert opts.encryption_algs == [b"aes128-ctr"]


async def test_only_public_keys_and_host_keys_whatever_the_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GSSAPI key exchange would authenticate the server without its host key
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host *\n  GSSAPIAuthentication yes\n  GSSAPIKeyExchange yes\n"
        "  HostbasedAuthentication yes\n  PasswordAuthentication yes\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    opts = await Connector(Inventory(), 5).options(SshTarget(name="h1", address="h1"))
    assert (opts.gss_kex, opts.gss_auth, opts.host_based_auth, opts.password_auth,
            opts.kbdint_auth) == (False, False, False, False, False)
    assert opts.public_key_auth
