"""Copy one file to N hosts with the parallel-ssh library (``ParallelSSHClient.copy_file``,
SFTP), as a new process timed whole by the harness like the command-line peers. Exit 1 if
any host failed."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, required=True, help="number of hosts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True, help="private key file")
    parser.add_argument("source")
    parser.add_argument("dest")
    args = parser.parse_args(argv)

    import gevent
    from pssh.clients import ParallelSSHClient

    client = ParallelSSHClient([args.host] * args.n, port=args.port, user=args.user,
                               pkey=args.key, pool_size=args.n, num_retries=1, timeout=60)
    jobs = client.copy_file(args.source, args.dest)
    gevent.joinall(jobs)
    failed = [job.exception for job in jobs if job.exception is not None]
    if failed:
        print(f"{len(failed)} of {args.n} hosts failed: {failed[0]!r}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
