"""The target's half of ``shoal agent install``/``uninstall``: a stdlib-only script the target's
``python3`` runs (``python3 -c SOURCE OP ARGS``), one operation per call, answering JSON.

Operations (``PREFIX`` is the install's root, /opt/shoal by default):

- ``probe PREFIX UNIT``: Python version, machine, hostname, the sha256 of every file the
  installer owns, whether the agent runs (and its pid), the node name in its agent.toml.
- ``put PATH MODE``: standard input into PATH, atomically (a fresh 0600 temporary file beside
  it, fsync, chmod, rename): a reader sees the old file or the new one, never half of one.
- ``venv PREFIX VERSION WHEEL...``: drop wheels not named, make PREFIX/venv anew with no pip,
  install shoal==VERSION from PREFIX/wheels with pip run from its wheel, offline.
- ``delete PREFIX PATH...``: files of PREFIX/wheels or PREFIX/etc no longer wanted.
- ``start PREFIX UNIT`` / ``stop PREFIX UNIT``: through systemd when UNIT is a path, else
  detached (``--no-systemd``): a new session (setsid), output to PREFIX/log/agent.log, its pid
  in PREFIX/run/agent.pid.
- ``remove PREFIX UNIT``: stop, disable and delete the unit, delete PREFIX.
- ``log PREFIX``: the agent's last log lines (systemd: the journal).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

UNIT_NAME = "shoal-agent.service"
STOP_WAIT = 40.0  # the agent's grace for its sessions, and more


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def owned_files(prefix: Path, unit: str) -> dict[str, str]:
    """What the installer writes (not the venv it makes from them, nor the agent's state)."""
    out: dict[str, str] = {}
    for sub in ("wheels", "etc"):
        d = prefix / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    out[f"{sub}/{p.name}"] = _sha256(p)
    if unit and Path(unit).is_file():
        out[unit] = _sha256(Path(unit))
    return out


def _alive(pid: int) -> bool:
    """Running, not a zombie (PID 1 may never reap an orphan)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pid(prefix: Path) -> int:
    """The detached agent's pid, if that process is still this install's agent."""
    try:
        pid = int((prefix / "run" / "agent.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return 0
    config = str(prefix / "etc" / "agent.toml").encode()
    return pid if config in cmdline and _alive(pid) else 0


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True)


def _unit_pid() -> int:
    done = _systemctl("show", "-p", "MainPID", "--value", UNIT_NAME)
    value = done.stdout.strip()
    return int(value) if value.isdigit() else 0


def _installed_version(prefix: Path) -> str:
    for info in (prefix / "venv").glob("lib/python*/site-packages/shoal-*.dist-info"):
        return info.name.removeprefix("shoal-").removesuffix(".dist-info")
    return ""


def probe(prefix: Path, unit: str) -> dict[str, Any]:
    name = ""
    try:
        name = str(tomllib.loads((prefix / "etc" / "agent.toml").read_text()).get("name", ""))
    except (OSError, tomllib.TOMLDecodeError):
        pass
    pid = _unit_pid() if unit else _pid(prefix)
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "machine": os.uname().machine, "hostname": socket.gethostname(),
            "files": owned_files(prefix, unit), "pid": pid if pid and _alive(pid) else 0,
            "version": _installed_version(prefix), "name": name,
            "systemd": Path("/run/systemd/system").is_dir()}


def put(path: Path, mode: int) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"sha256": _sha256(path)}


def delete(prefix: Path, paths: list[str]) -> dict[str, Any]:
    for path in paths:
        if Path(path).parent.parent != prefix:  # wheels/X, etc/X: nothing else
            raise SystemExit(f"will not delete {path}: not a file of {prefix}")
        Path(path).unlink(missing_ok=True)
    return {"deleted": len(paths)}


def venv(prefix: Path, version: str, wheels: list[str]) -> dict[str, Any]:
    wheel_dir = prefix / "wheels"
    for p in wheel_dir.iterdir():
        if p.name not in wheels:
            p.unlink()
    pip = next((w for w in wheels if w.startswith("pip-")), "")
    target = prefix / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(target)],
                   check=True, capture_output=True, text=True)
    done = subprocess.run(
        [str(target / "bin" / "python"), str(wheel_dir / pip / "pip"), "install", "-q",
         "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--find-links",
         str(wheel_dir), f"shoal=={version}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pip could not install shoal {version} from {wheel_dir}: "
                         f"{(done.stderr or done.stdout).strip()[-1500:]}")
    return {"version": _installed_version(prefix)}


def _agent_env(prefix: Path) -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"), "LANG": os.environ.get("LANG", "C.UTF-8"),
            "SHOAL_HOME": str(prefix / "etc"), "PYTHONUNBUFFERED": "1"}


def start(prefix: Path, unit: str) -> dict[str, Any]:
    if unit:
        for args in (("daemon-reload",), ("enable", UNIT_NAME), ("restart", UNIT_NAME)):
            done = _systemctl(*args)
            if done.returncode != 0:
                raise SystemExit(f"systemctl {' '.join(args)}: {done.stderr.strip()}")
        return {"pid": _unit_pid()}
    stop(prefix, unit)
    (prefix / "log").mkdir(mode=0o700, exist_ok=True)
    (prefix / "run").mkdir(mode=0o700, exist_ok=True)
    log = os.open(prefix / "log" / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    proc = subprocess.Popen(
        [str(prefix / "venv" / "bin" / "shoal"), "agent", "--config",
         str(prefix / "etc" / "agent.toml")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=_agent_env(prefix),
        start_new_session=True)
    os.close(log)
    pidfile = prefix / "run" / "agent.pid"
    tmp = pidfile.with_name(".agent.pid.tmp")
    tmp.write_text(f"{proc.pid}\n")
    os.replace(tmp, pidfile)
    return {"pid": proc.pid}


def stop(prefix: Path, unit: str) -> dict[str, Any]:
    if unit:
        if Path(unit).exists():
            _systemctl("stop", UNIT_NAME)
        return {"stopped": True}
    pid = _pid(prefix)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    (prefix / "run" / "agent.pid").unlink(missing_ok=True)
    return {"stopped": bool(pid)}


def remove(prefix: Path, unit: str) -> dict[str, Any]:
    had = prefix.exists() or bool(unit and Path(unit).exists())
    stop(prefix, unit)
    if unit and Path(unit).exists():
        _systemctl("disable", UNIT_NAME)
        Path(unit).unlink()
        _systemctl("daemon-reload")
    shutil.rmtree(prefix, ignore_errors=True)
    return {"removed": had, "left": prefix.exists()}


def log(prefix: Path, unit: str) -> dict[str, Any]:
    if unit:
        done = subprocess.run(["journalctl", "-u", UNIT_NAME, "-n", "30", "--no-pager"],
                              capture_output=True, text=True)
        return {"log": done.stdout[-4000:]}
    try:
        text = (prefix / "log" / "agent.log").read_text(errors="replace")
    except OSError:
        text = ""
    return {"log": "\n".join(text.splitlines()[-30:])}


def main(argv: list[str]) -> None:
    op, args = argv[0], argv[1:]
    if op == "put":
        result = put(Path(args[0]), int(args[1], 8))
    elif op == "delete":
        result = delete(Path(args[0]), args[1:])
    elif op == "venv":
        result = venv(Path(args[0]), args[1], args[2:])
    else:
        ops = {"probe": probe, "start": start, "stop": stop, "remove": remove, "log": log}
        result = ops[op](Path(args[0]), args[1] if len(args) > 1 else "")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
