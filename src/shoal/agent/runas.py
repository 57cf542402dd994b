"""Named users a run or a session may ask for (``shoal run --user NAME``, a session's
``user``), like Ansible's ``become_user`` or Salt's ``runas``.

Only users the agent's ``run_as`` setting lists (empty by default: none), root included;
never a throwaway user of another session. The process gets the user's uid, primary gid and
supplementary groups (as ``initgroups`` would), its home as the working directory, and HOME,
USER, LOGNAME and SHELL; it stays in the run's or session's cgroup like any other.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Collection
from dataclasses import dataclass

from . import users


class RunAsError(Exception):
    pass


@dataclass(frozen=True)
class NamedUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, from the group database
    home: str
    shell: str

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name,
                "SHELL": self.shell or "/bin/sh"}


def resolve(name: str, allowed: Collection[str]) -> NamedUser:
    """The user ``name`` as this agent may run it, or RunAsError saying why not."""
    if name not in allowed:
        listed = ", ".join(sorted(allowed)) or "none"
        raise RunAsError(f"user {name!r} is not allowed on this node: its agent's run_as "
                         f"setting (agent.toml) lists {listed}; add {name!r} there to allow it")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise RunAsError(f"no user {name!r} on this node") from None
    if pw.pw_name.startswith(users.PREFIX) and pw.pw_gecos == users.COMMENT:
        raise RunAsError(f"{name!r} is a throwaway user of a session")
    if os.geteuid() != 0 and os.geteuid() != pw.pw_uid:
        raise RunAsError(f"the agent is not root, so it cannot run as {name!r}")
    groups = tuple(sorted(set(os.getgrouplist(name, pw.pw_gid))))
    return NamedUser(name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell)
