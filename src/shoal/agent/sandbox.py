"""A private view of the machine for throwaway users, like systemd's ``PrivateTmp=``,
``ProtectSystem=strict`` and ``RemoveIPC=``: set up in the child between fork and exec,
while it is still root.

- a mount namespace of its own, with a fresh size-capped tmpfs on /tmp, /var/tmp,
  /dev/shm and /run/lock, and another on the user's home (mode 0700, owned by the user);
- the root filesystem read-only in that namespace, so the only files the user can write
  live on those tmpfs, which vanish with the namespace (its last process);
- an IPC namespace of its own, so SysV IPC objects and POSIX queues vanish with it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
TMP_MB = 256  # each private temporary directory
HOME_MB = 512


@dataclass(frozen=True)
class Sandbox:
    uid: int
    gid: int
    home: str
    tmp_mb: int = TMP_MB
    home_mb: int = HOME_MB

    def mounts(self) -> list[tuple[str, str]]:
        """(directory, tmpfs options) to mount, in order."""
        out = [(d, f"size={self.tmp_mb}m,mode=1777") for d in SHARED_TMP]
        out.append((self.home, f"size={self.home_mb}m,mode=0700,uid={self.uid},gid={self.gid}"))
        return out


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def enter(box: Sandbox) -> None:
    """In the child, as root: unshare and mount. The caller drops privileges after."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here leaks out
    for d, opts in box.mounts():
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | _root_flags()
    _mount(None, "/", None, flags)


def _root_flags() -> int:
    # A bind remount must keep the flags the mount already has (nosuid, nodev...).
    st = os.statvfs("/")
    flags = 0
    if st.f_flag & os.ST_NOSUID:
        flags |= MS_NOSUID
    if st.f_flag & os.ST_NODEV:
        flags |= MS_NODEV
    return flags
