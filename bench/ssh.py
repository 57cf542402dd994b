"""Issue 17: shoal's ssh path (`shoal run -H 'h[1-N]' -- true`, no agent anywhere) against
pssh, clush and parallel-ssh on the bench's private sshd, N = 10, 50, 100.

Run from the repository root with `python -m bench.ssh` (bench/run.py runs it too). Writes
bench/results/ssh.{md,json} and prints the rows as JSON on stdout for bench/run.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import peers
from bench.harness import (
    RESULTS_DIR,
    Case,
    Deadline,
    Row,
    compare_main,
    find_shoal,
    log,
    measure,
)
from bench.sshd import SshEnv, ensure_packages, private_sshd

WORKLOAD = "ssh-fanout-true"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ssh", description=__doc__)
    parser.add_argument("--ns", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[10, 50, 100], help="host counts")
    parser.add_argument("--runs", type=int, default=5, help="counted runs per case")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted warm-up runs")
    parser.add_argument("--budget", type=float,
                        default=float(os.environ.get("BENCH_DEADLINE_S", 600)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def shoal_home(root: Path, ssh: SshEnv) -> dict[str, str]:
    """A HOME whose ~/.ssh/config is the bench's and whose known_hosts has the sshd's key:
    shoal checks host keys (the peers are told not to)."""
    home = root / "shoal-home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    known = home / ".ssh" / "known_hosts"
    (home / ".ssh" / "config").write_text(ssh.config.read_text().replace(
        "StrictHostKeyChecking no", "StrictHostKeyChecking yes").replace(
        "UserKnownHostsFile /dev/null", f"UserKnownHostsFile {known}"))
    key = (ssh.root / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{ssh.port} {' '.join(key)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update(HOME=str(home), SHOAL_HOME=str(home / "shoal"))
    return env


def bench(args: argparse.Namespace, root: Path, deadline: Deadline, rows: list[Row]) -> None:
    ensure_packages()
    # Every tool here is a new Python process (but pssh): with PYTHONDONTWRITEBYTECODE set
    # each would compile its imports on every run, so compile them once for all, shoal's
    # own package too (an editable install keeps it in src/, outside purelib).
    import compileall
    import importlib.util
    import sysconfig

    compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=1, workers=2)
    spec = importlib.util.find_spec("shoal")
    for where in (spec.submodule_search_locations or []) if spec else []:
        compileall.compile_dir(where, quiet=1, workers=2)
    shoal = Path(os.environ["SHOAL_BIN"]) if os.environ.get("SHOAL_BIN") else find_shoal()
    with private_sshd(root / "sshd", max(args.ns)) as ssh:
        env = shoal_home(root, ssh)
        for n in args.ns:
            timeout = min(180.0, 30.0 + 0.3 * n)
            cases = [Case(WORKLOAD, peers.SHOAL, n,
                          [str(shoal), "run", "-H", f"h[1-{n}]", "--connect-timeout", "30",
                           "--", "true"], env=env,
                          timeout_s=timeout, skip=None if shoal else "shoal not found")]
            for tool, (build, missing) in peers.FANOUT_PEERS.items():
                cases.append(Case(WORKLOAD, tool, n, build(ssh, n, "true"), timeout_s=timeout,
                                  skip=missing()))
            log(f"ssh fan-out over {n} hosts")
            measure(cases, deadline, rows, runs=args.runs, warmup=args.warmup)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    preamble = ("\nEach tool as a new process running `true` on N "
                "aliases of one private sshd on 127.0.0.1; shoal checks host keys against "
                "known_hosts, the peers are run with StrictHostKeyChecking=no; shoal waits "
                "30 s for a connection (--connect-timeout), as parallel-ssh does. ratio = peer "
                "median / shoal median (above 1: shoal is faster).\n")
    title = "ssh fan-out: shoal -H against pssh, clush, parallel-ssh"
    return compare_main(args, bench, "ssh", title, preamble, "shoal-ssh-")


if __name__ == "__main__":
    sys.exit(main())
