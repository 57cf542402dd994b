"""``copy``/``rcopy`` on ssh hosts, over SFTP, with the checks the agents' copies make.

push: the file goes to a temporary file beside the destination (created exclusively), the
host's ``sha256sum`` of it must match ours, then mode and mtime are set and it is renamed
into place (``posix-rename``, atomic); on any failure the temporary file is removed.
pull: the remote file must be regular and under the size limit; it is written to
``DIR/.NAME.node.part`` while hashed, checked against the host's ``sha256sum``, given the
remote mode and mtime and renamed to ``DIR/NAME.node``. Failures end the host with the
status the agents' copy script uses and a reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import secrets
import shlex
import stat
import time
from pathlib import Path

import asyncssh

from ..wire import messages as m
from .fanout import HostIO, Work

CHUNK = 1 << 20


def _end(io: HostIO, started: float, code: int, reason: str = "") -> m.Exit:
    return m.Exit(node=io.target.name, code=code, reason=reason, started=started,
                  ended=time.time())


async def _remote_sha256(conn: asyncssh.SSHClientConnection, path: str) -> str:
    done = await conn.run(f"sha256sum -- {shlex.quote(path)}", check=False)
    out = done.stdout if isinstance(done.stdout, str) else ""
    return out.split(" ", 1)[0] if done.exit_status == 0 else ""


def push_work(source: Path, dest: str, digest: str, mode: int, mtime: int) -> Work:
    async def work(conn: asyncssh.SSHClientConnection, io: HostIO) -> m.Exit:
        started = time.time()
        target = dest.replace("{node}", io.target.name)
        async with conn.start_sftp_client() as sftp:
            if await sftp.isdir(target):
                target = posixpath.join(target, source.name)
            directory = posixpath.dirname(target) or "."
            if not await sftp.isdir(directory):
                return _end(io, started, 2, f"no such directory: {directory}")
            tmp = posixpath.join(directory, f".shoal-copy.{secrets.token_hex(6)}")
            try:
                try:
                    f = await sftp.open(tmp, "xb")
                except asyncssh.SFTPError as e:
                    return _end(io, started, 3, f"cannot create {tmp}: {e.reason}")
                try:
                    with open(source, "rb") as local:
                        while chunk := local.read(CHUNK):
                            await f.write(chunk)
                finally:
                    await f.close()
                got = await _remote_sha256(conn, tmp)
                if got != digest:
                    return _end(io, started, 5,
                                f"sha256 mismatch: got {got or 'nothing'}, expected {digest}")
                await sftp.chmod(tmp, mode)
                await sftp.utime(tmp, (mtime, mtime))
                await sftp.posix_rename(tmp, target)
                tmp = ""
            except asyncssh.SFTPError as e:
                return _end(io, started, 6, f"{target}: {e.reason}")
            finally:
                if tmp:
                    with contextlib.suppress(asyncssh.Error, OSError):
                        await sftp.remove(tmp)
        return _end(io, started, 0)

    return work


def pull_work(source: str, directory: Path, name: str, limit: int) -> Work:
    async def work(conn: asyncssh.SSHClientConnection, io: HostIO) -> m.Exit:
        started = time.time()
        node = io.target.name
        path = source.replace("{node}", node)
        part = directory / f".{name}.{node}.part"
        async with conn.start_sftp_client() as sftp:
            try:
                attrs = await sftp.stat(path)
            except asyncssh.SFTPError as e:
                return _end(io, started, 2, f"{path}: {e.reason}")
            if attrs.permissions is None or not stat.S_ISREG(attrs.permissions):
                return _end(io, started, 2, f"not a regular file: {path}")
            if (attrs.size or 0) > limit:
                return _end(io, started, 3, f"{path} is {attrs.size} bytes, over the "
                                            f"--max-size of {limit}")
            h = hashlib.sha256()
            try:
                with open(part, "wb") as out:
                    async with sftp.open(path, "rb") as f:
                        while (data := await f.read(CHUNK)) and isinstance(data, bytes):
                            h.update(data)
                            out.write(data)
                got = await _remote_sha256(conn, path)
                if got != h.hexdigest():
                    return _end(io, started, 5, "sha256 mismatch (the file changed while it "
                                                "was read?)")
                os.chmod(part, stat.S_IMODE(attrs.permissions))
                mtime = attrs.mtime or 0
                os.utime(part, (mtime, mtime))
                os.replace(part, directory / f"{name}.{node}")
            except asyncssh.SFTPError as e:
                return _end(io, started, 4, f"{path}: {e.reason}")
            finally:
                part.unlink(missing_ok=True)
        return _end(io, started, 0)

    return work


def script_work(script: str, args: list[str], stdin: Path) -> Work:
    """Run one of the agents' copy scripts (``sh -c SCRIPT``) on each host with ``stdin``
    as its input: the same checks on ssh hosts as on agents. ``{node}`` in the first
    argument is the host's name."""
    async def work(conn: asyncssh.SSHClientConnection, io: HostIO) -> m.Exit:
        started = time.time()
        argv = ["sh", "-c", script, "shoal-copy",
                args[0].replace("{node}", io.target.name), *args[1:]]
        done = await conn.run(shlex.join(argv), stdin=str(stdin), encoding=None, check=False)
        err = done.stderr if isinstance(done.stderr, bytes) else b""
        if err:
            io.output("stderr", err)
        code = done.exit_status if done.exit_status is not None else 255
        return _end(io, started, code)

    return work
