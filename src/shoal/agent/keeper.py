"""The keeper: a small process beside the agent that ends the agent's cgroups when the agent
dies without stopping (SIGKILL, OOM kill, crash), so that no session process outlives it.

The agent starts it with a pipe on its stdin whose write end only the agent holds (it is not
inherited by sessions). A clean stop writes ``stop`` first; EOF without it means the agent
is gone: the keeper SIGTERMs every process of the agent's nodes' units, kills what is left
after the grace period, removes the directories (and the bases, once empty) and exits.
Throwaway users and session records are left to the agent's next start (ledger.py), which
needs NATS.

    python -m shoal.agent.keeper GRACE NODE[,NODE...] BASE_DIR [BASE_DIR...]
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from . import cgroups


def start(grace: float, nodes: list[str], base_dirs: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.agent.keeper", str(grace), ",".join(nodes), *base_dirs],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
        close_fds=True)


def release(keeper: subprocess.Popen[bytes]) -> None:
    """The agent stops cleanly: the keeper leaves without touching anything."""
    assert keeper.stdin is not None
    try:
        keeper.stdin.write(b"stop\n")
        keeper.stdin.close()
        keeper.wait(10)
    except (OSError, subprocess.TimeoutExpired):
        keeper.kill()
        keeper.wait()


def units(nodes: list[str], base_dirs: list[str]) -> list[str]:
    found = []
    for base in base_dirs:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        found += [os.path.join(base, n) for n in names
                  if any(n.startswith(node + ".") for node in nodes)]
    return sorted(found)


def main(argv: list[str]) -> int:
    grace, nodes, base_dirs = float(argv[0]), argv[1].split(","), argv[2:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the agent
    said = b""
    while chunk := os.read(0, 64):
        said += chunk
    if said.startswith(b"stop"):
        return 0
    asyncio.run(cgroups.end_dirs(units(nodes, base_dirs), grace))
    for base in base_dirs:  # only if empty: other agents of the state dir may still use it
        cgroups.remove_dir(base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
