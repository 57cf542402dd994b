"""The cgroup layout, pure: from what the kernel shows (/proc/self/mountinfo and
/proc/self/cgroup) to which hierarchy tracks a unit and which holds each limit, the unit's
directories, and the files that set its limits. No I/O: agent/cgroups.py reads and writes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..wire import messages as m

LIMIT_CONTROLLERS = ("memory", "pids", "cpu")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
Kind = Literal["v1", "v2"]


@dataclass(frozen=True)
class Hierarchy:
    kind: Kind
    mount: str  # where the hierarchy is mounted
    own: str  # the agent's cgroup inside it, as a directory ("/sys/fs/cgroup/memory/x")
    controllers: frozenset[str]  # for v1 the mount's own; for v2 what cgroup.controllers lists


@dataclass(frozen=True)
class Layout:
    """Which hierarchy does what for this agent. ``base`` is the subtree name below the
    agent's own cgroup (``shoal.<tag>``) where its units go."""

    base: str
    tracker: Hierarchy | None  # v2 (populated, kill) or v1 freezer (freeze and kill)
    limits: dict[str, Hierarchy] = field(default_factory=dict)  # controller -> hierarchy

    def hierarchies(self) -> list[Hierarchy]:
        out = [self.tracker] if self.tracker is not None else []
        for h in self.limits.values():
            if h not in out:
                out.append(h)
        return out

    def base_dirs(self) -> list[str]:
        return [os.path.join(h.own, self.base) for h in self.hierarchies()]

    def unit_dirs(self, name: str) -> list[str]:
        return [os.path.join(d, name) for d in self.base_dirs()]

    def describe(self) -> str:
        """For logs and ``shoal nodes``: ``v2`` or ``v2+v1(memory,pids,cpu)`` and so on."""
        if self.tracker is None:
            return ""
        parts: list[str] = ["v2" if self.tracker.kind == "v2" else "v1 freezer"]
        v1 = sorted(c for c, h in self.limits.items() if h.kind == "v1")
        v2 = sorted(c for c, h in self.limits.items() if h.kind == "v2")
        if v2:
            parts[0] += f"({','.join(v2)})"
        if v1:
            parts.append(f"v1({','.join(v1)})")
        return "+".join(parts)


def parse_mountinfo(text: str) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """(v2 mount point, {v1 controller: mount point}, {mount point: root inside the
    hierarchy}) from /proc/self/mountinfo."""
    v2: str | None = None
    v1: dict[str, str] = {}
    roots: dict[str, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point, fstype = _unescape(fields[3]), _unescape(fields[4]), tail[0]
        if fstype == "cgroup2" and v2 is None:
            v2 = point
            roots[point] = root
        elif fstype == "cgroup":
            for opt in tail[2].split(","):
                if opt in LIMIT_CONTROLLERS or opt == "freezer":
                    v1.setdefault(opt, point)
                    roots[point] = root
    return v2, v1, roots


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """{controller: path} from /proc/<pid>/cgroup; the v2 path is under the key ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        for c in ctrls.split(",") if ctrls else [""]:
            out.setdefault(c, path)
    return out


def _join(mount: str, root: str, path: str) -> str | None:
    """The directory of cgroup ``path`` in a hierarchy mounted at ``mount`` whose mount
    shows the subtree ``root``; None when the path is outside what is mounted."""
    if root not in ("", "/"):
        if path != root and not path.startswith(root.rstrip("/") + "/"):
            return None
        path = path[len(root):]
    return os.path.normpath(mount + "/" + path.lstrip("/")) if path.strip("/") else mount


def plan(mountinfo: str, proc_cgroup: str, v2_controllers: Iterable[str],
         base: str) -> Layout | str:
    """Decide the layout from what the kernel shows; a string says why there is none.
    ``v2_controllers`` are those the agent can enable below its own v2 cgroup."""
    v2_mount, v1_mounts, roots = parse_mountinfo(mountinfo)
    own = parse_proc_cgroup(proc_cgroup)
    v2: Hierarchy | None = None
    if v2_mount is not None and "" in own:
        d = _join(v2_mount, roots.get(v2_mount, "/"), own[""])
        if d is not None:
            v2 = Hierarchy("v2", v2_mount, d, frozenset(v2_controllers) & set(LIMIT_CONTROLLERS))
    v1: dict[str, Hierarchy] = {}
    for ctrl, point in v1_mounts.items():
        if ctrl in own:
            d = _join(point, roots.get(point, "/"), own[ctrl])
            if d is not None:
                v1[ctrl] = Hierarchy("v1", point, d, frozenset({ctrl}))
    tracker = v2 if v2 is not None else v1.get("freezer")
    if tracker is None:
        return "no cgroup v2 mount and no v1 freezer hierarchy"
    limits: dict[str, Hierarchy] = {}
    for ctrl in LIMIT_CONTROLLERS:
        if v2 is not None and ctrl in v2.controllers:
            limits[ctrl] = v2
        elif ctrl in v1:
            limits[ctrl] = v1[ctrl]
    return Layout(base, tracker, limits)


def unit_name(node: str, kind: str, ident: str) -> str:
    """``<node>.<kind>.<id>``: node names and ids have no dots, so ``<node>.`` prefixes
    exactly one node's units. Anything unusual in an id becomes ``_``."""
    return f"{node}.{kind}.{_safe_id(ident)}"


@functools.lru_cache(maxsize=64)  # one run id for every node of a fan-out
def _safe_id(ident: str) -> str:
    return "".join(c if c in _SAFE else "_" for c in ident[:80])


def cpu_shares(weight: int) -> int:
    """v2 cpu.weight (1..10000, default 100) as v1 cpu.shares (default 1024)."""
    return max(2, weight * 1024 // 100)


def sets_cgroup_limit(limits: m.Limits) -> bool:
    """Does ``limits`` need a limit file in some controller (``limit_files``)?"""
    return bool(limits.memory_mb or limits.processes or limits.cpu_weight)


def limit_files(kind: Kind, controller: str, limits: m.Limits) -> list[tuple[str, str]]:
    """The files to write, in order, for ``limits`` in one controller."""
    out: list[tuple[str, str]] = []
    if controller == "memory" and limits.memory_mb:
        value = str(limits.memory_mb << 20)
        if kind == "v2":
            out += [("memory.max", value), ("memory.swap.max", "0")]
        else:
            out += [("memory.limit_in_bytes", value), ("memory.memsw.limit_in_bytes", value)]
    elif controller == "pids" and limits.processes:
        out.append(("pids.max", str(limits.processes)))
    elif controller == "cpu" and limits.cpu_weight:
        out.append(("cpu.weight", str(limits.cpu_weight)) if kind == "v2"
                   else ("cpu.shares", str(cpu_shares(limits.cpu_weight))))
    return out


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cgroup.events, memory.events, memory.oom_control, pids.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out
