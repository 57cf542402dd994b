"""Issue 16: ``shoal copy`` of one file to N nodes against pscp (Debian's pssh), pdcp
(Debian's pdsh), ``clush --copy`` (ClusterShell) and parallel-ssh's ``copy_file`` (the
library, SFTP) on the bench's private sshd, N = 10, 50.

shoal is measured twice: to N virtual agents (the file is the run's stdin, sent once through
NATS) and to the same N sshd aliases as the peers (``-H``, SFTP). Each tool writes the same
destination on every node (the peers have no per-node paths); shoal through a temporary
file and a rename, the peers in place. Run from the repository root with
``python -m bench.copy`` (bench/run.py runs it too). Writes bench/results/copy.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    shoal_fleet,
)
from bench.ssh import shoal_home
from bench.sshd import DEBIAN_PSSH, SshEnv, ensure_packages, private_sshd

WORKLOAD = "copy-100MiB"
PSCP = DEBIAN_PSSH.parent / "parallel-scp"
PDCP = Path("/usr/bin/pdcp")
SHOAL_SSH = "shoal-ssh"
PSSH_LIB_COPY = Path(__file__).with_name("pssh_lib_copy.py")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.copy", description=__doc__)
    parser.add_argument("--ns", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[10, 50], help="node counts")
    parser.add_argument("--mib", type=int, default=100, help="file size in MiB")
    parser.add_argument("--runs", type=int, default=3, help="counted runs per case")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted warm-up runs")
    parser.add_argument("--budget", type=float,
                        default=float(os.environ.get("BENCH_DEADLINE_S", 900)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def pscp_argv(ssh: SshEnv, n: int, src: Path, dest: Path) -> list[str]:
    return [str(PSCP), "-h", str(ssh.hostsfile(n)), "-p", str(n), "-t", "0",
            "-x", f"-F {ssh.config}", str(src), str(dest)]


def pdcp_argv(ssh: SshEnv, n: int, src: Path, dest: Path) -> tuple[list[str], dict[str, str]]:
    """pdcp over ssh (its rcmd module runs ``ssh ARGS host pdcp -z DEST``, the receiving
    pdcp on the host: here, this machine's). PDSH_SSH_ARGS brings in our ssh_config."""
    env = {**os.environ, "PDSH_RCMD_TYPE": "ssh",
           "PDSH_SSH_ARGS": f"-F {ssh.config} -x -a %h"}
    return [str(PDCP), "-w", f"h[1-{n}]", "-f", str(n), str(src), str(dest)], env


def pssh_lib_copy_argv(ssh: SshEnv, n: int, src: Path, dest: Path) -> list[str]:
    return [sys.executable, "-P", str(PSSH_LIB_COPY), "-n", str(n), "--port", str(ssh.port),
            "--user", ssh.user, "--key", str(ssh.key), str(src), str(dest)]


def clush_copy_argv(ssh: SshEnv, n: int, src: Path, dest: Path) -> list[str]:
    clush = peers.find_executable("clush")
    return [str(clush or "clush"), "-S", "-w", f"h[1-{n}]", "-f", str(n),
            "-o", f"-F {ssh.config}", "--copy", str(src), "--dest", str(dest)]


def bench(args: argparse.Namespace, root: Path, deadline: Deadline, rows: list[Row]) -> None:
    ensure_packages()
    shoal = Path(os.environ["SHOAL_BIN"]) if os.environ.get("SHOAL_BIN") else find_shoal()
    src = root / "payload.bin"
    with src.open("wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(1 << 20))
    workload = f"copy-{args.mib}MiB"
    with private_sshd(root / "sshd", max(args.ns)) as ssh:
        ssh_env = shoal_home(root, ssh)
        for n in args.ns:
            out = root / f"out-{n}"
            out.mkdir()
            timeout = 60.0 + 2.0 * n
            cases: list[Case] = []
            with shoal_fleet(shoal, root, n, deadline) if shoal else _none() as fleet:
                if fleet is not None:
                    cases.append(Case(workload, peers.SHOAL, n,
                                      [str(shoal), "copy", "--all", str(src),
                                       str(out / "shoal.bin")],
                                      env=fleet.env, timeout_s=timeout, check=fleet.problem))
                cases.append(Case(workload, SHOAL_SSH, n,
                                  [str(shoal), "copy", "-H", f"h[1-{n}]", str(src),
                                   str(out / "shoal-ssh.bin")], env=ssh_env,
                                  timeout_s=timeout, skip=None if shoal else "shoal not found"))
                cases.append(Case(workload, "pscp", n,
                                  pscp_argv(ssh, n, src, out / "pscp.bin"), timeout_s=timeout,
                                  skip=None if PSCP.exists() else "parallel-scp not installed"))
                pdcp, pdcp_env = pdcp_argv(ssh, n, src, out / "pdcp.bin")
                cases.append(Case(workload, "pdcp", n, pdcp, env=pdcp_env, timeout_s=timeout,
                                  skip=None if PDCP.exists() else "pdcp (pdsh) not installed"))
                cases.append(Case(workload, peers.CLUSH, n,
                                  clush_copy_argv(ssh, n, src, out),
                                  timeout_s=timeout, skip=peers.FANOUT_PEERS[peers.CLUSH][1]()))
                cases.append(Case(workload, peers.PSSH_LIB, n,
                                  pssh_lib_copy_argv(ssh, n, src, out / "pssh-lib.bin"),
                                  timeout_s=timeout,
                                  skip=peers.FANOUT_PEERS[peers.PSSH_LIB][1]()))
                log(f"copy of {args.mib} MiB to {n} nodes")
                measure(cases, deadline, rows, runs=args.runs, warmup=args.warmup)
            shutil.rmtree(out, ignore_errors=True)


class _none:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    preamble = (f"\nEach tool as a new process copying one {args.mib} MiB "
                "file to N nodes: `shoal` to N virtual agents (`shoal copy --all`, the file "
                "sent once through NATS, sha256 checked on each node, renamed into place), "
                "`shoal-ssh` to the N aliases of the private sshd on 127.0.0.1 (`shoal copy "
                "-H`, SFTP, same checks), pscp (`parallel-scp`, Debian's pssh), pdcp (Debian's "
                "pdsh, over ssh), `clush --copy` and the parallel-ssh library's `copy_file` "
                "(SFTP) to the same aliases. The peers write in place and check nothing; shoal "
                "writes a temporary file, hashes it and renames it on every node: here the N "
                "copies share one 2-core machine, so shoal's N sha256 passes compete for its "
                "cores where a real fleet runs one per host. ratio = peer median / shoal "
                "median (above 1: shoal is faster).\n")
    title = "copy: shoal copy against pscp, pdcp, clush --copy and parallel-ssh copy_file"
    return compare_main(args, bench, "copy", title, preamble, "shoal-copy-")


if __name__ == "__main__":
    sys.exit(main())
