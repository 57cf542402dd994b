"""Run one command on N hosts with the parallel-ssh library (`pssh.clients`) and print output.

Timed as a whole new process by the harness, like the command-line peers. Exit 1 if any host
failed.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, fan the command out, print `host: line` output, return 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, required=True, help="number of hosts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True, help="private key file")
    parser.add_argument("command")
    args = parser.parse_args(argv)

    from pssh.clients import ParallelSSHClient

    client = ParallelSSHClient(
        [args.host] * args.n,
        port=args.port,
        user=args.user,
        pkey=args.key,
        pool_size=args.n,
        num_retries=1,
        timeout=30,
    )
    output = client.run_command(args.command)
    client.join(output)
    failed = 0
    write = sys.stdout.write
    for index, host_out in enumerate(output):
        for line in host_out.stdout or ():
            write(f"{host_out.host}#{index}: {line}\n")
        if host_out.exception is not None or host_out.exit_code != 0:
            failed += 1
    sys.stdout.flush()
    if failed:
        print(f"{failed} of {args.n} hosts failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
