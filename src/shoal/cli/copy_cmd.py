"""``shoal copy`` (to many nodes) and ``shoal rcopy`` (from many nodes), on ``shoal run``.

A copy is a run: the file is the run's stdin, which the controller broadcasts once to every
node (one upload however many receive it), and a fixed POSIX sh script (argv, never text
built from user input) writes it to a temporary file beside the destination, checks its
sha256, sets mode and mtime and renames it into place. ``rcopy`` runs ``cat`` and writes
each node's stdout to ``DIR/NAME.node``, checked against the sha256 the node reports.
docs/cli.md says why this reuses the run machinery instead of a dedicated agent operation.

Over 400 lines: copy and rcopy share their targets, checks, progress and summary; files and
trees, agents and ssh hosts are four cases of one command.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import click
import msgspec

from ..logic.lines import prefix_lines
from ..logic.treecopy import LISTING_SH
from ..wire import messages as m
from .main import checking, client_config, fail, main
from .options import group_refs, target_options
from .printers import Prefixed
from .ssh_opts import SshChoice, choose, ssh_options

DEFAULT_MAX = "4G"
_SIZE = re.compile(r"(\d+)([KMGT]?)i?B?", re.IGNORECASE)

# $1 dest  $2 sha256  $3 mode  $4 mtime  $5 source basename
PUSH = r"""
dest=$(printf '%s' "$1" | sed "s/{node}/$SHOAL_NODE/g")
if [ -d "$dest" ]; then dest="$dest/$5"; fi
dir=$(dirname -- "$dest")
[ -d "$dir" ] || { echo "no such directory: $dir" >&2; exit 2; }
tmp=$(mktemp "$dir/.shoal-copy.XXXXXX") || exit 3
trap 'rm -f -- "$tmp"' EXIT
cat > "$tmp" || exit 4
got=$(sha256sum < "$tmp") && got=${got%% *}
[ "$got" = "$2" ] || { echo "sha256 mismatch: got $got, expected $2" >&2; exit 5; }
chmod "$3" "$tmp" && touch -m -d "@$4" "$tmp" && mv -f -- "$tmp" "$dest" || exit 6
trap - EXIT
"""

# A tree (copy -r): the tar stream to a temporary file, its sha256 checked, unpacked into a
# temporary directory beside the destination (owners not kept: the files are the runner's),
# the canonical listing's sha256 checked (shoal/logic/treecopy.py), then swapped into place.
# $1 dest  $2 tar sha256  $3 listing sha256  $4 source basename
PUSH_TREE = r"""
dest=$(printf '%s' "$1" | sed "s/{node}/$SHOAL_NODE/g")
if [ -d "$dest" ] && [ ! -L "$dest" ]; then dest="${dest%/}/$4"; fi
if [ -L "$dest" ] || { [ -e "$dest" ] && [ ! -d "$dest" ]; }; then
  echo "$dest exists and is not a directory" >&2; exit 2; fi
dir=$(dirname -- "$dest")
[ -d "$dir" ] || { echo "no such directory: $dir" >&2; exit 2; }
tmp=$(mktemp -d "$dir/.shoal-copy.XXXXXX") || exit 3
trap 'rm -rf -- "$tmp" "$tmp.tar"' EXIT
cat > "$tmp.tar" || exit 4
got=$(sha256sum < "$tmp.tar") && got=${got%% *}
[ "$got" = "$2" ] || { echo "sha256 mismatch: got $got, expected $2" >&2; exit 5; }
tar -x --no-same-owner -p --delay-directory-restore -f "$tmp.tar" -C "$tmp" || exit 6
rm -f -- "$tmp.tar"
got=$(cd "$tmp" && { LISTING; } | sha256sum) && got=${got%% *}
[ "$got" = "$3" ] || { echo "tree listing mismatch: got $got, expected $3" >&2; exit 5; }
if [ -d "$dest" ]; then
  old=$(mktemp -d "$dir/.shoal-old.XXXXXX") || exit 6
  mv -T -- "$dest" "$old/tree" && mv -T -- "$tmp" "$dest" || exit 6
  rm -rf -- "$old"
else mv -T -- "$tmp" "$dest" || exit 6; fi
trap - EXIT
""".replace("LISTING", LISTING_SH)

# $1 path  $2 max bytes
PULL = r"""
f=$(printf '%s' "$1" | sed "s/{node}/$SHOAL_NODE/g")
[ -f "$f" ] || { echo "not a regular file: $f" >&2; exit 2; }
size=$(stat -c %s -- "$f") || exit 3
[ "$size" -le "$2" ] || { echo "$f is $size bytes, over the --max-size of $2" >&2; exit 3; }
sum=$(sha256sum < "$f") && sum=${sum%% *} || exit 3
meta=$(stat -c '%a %Y' -- "$f") || exit 3
cat -- "$f" || exit 4
printf 'shoal-rcopy %s %s\n' "$sum" "$meta" >&2
"""

# A tree (rcopy -r): its canonical listing's sha256 (checked here after unpacking), then the
# tree as a tar stream on stdout. The top may be a link to a directory (as `cp -r DIR/`);
# nothing inside is followed.  $1 path  $2 max bytes
PULL_TREE = r"""
d=$(printf '%s' "$1" | sed "s/{node}/$SHOAL_NODE/g")
[ -d "$d" ] || { echo "not a directory: $d" >&2; exit 2; }
size=$(du -s -b -- "$d") && size=${size%%[!0-9]*} || exit 3
[ "$size" -le "$2" ] || { echo "$d is $size bytes, over the --max-size of $2" >&2; exit 3; }
list=$(cd "$d" && { LISTING; }) || { echo "cannot read the tree $d" >&2; exit 3; }
odd=$(printf '%s\n' "$list" | sed -n 's/^o \.\///p' | head -n 3)
[ -z "$odd" ] || { echo "not a file, directory or symlink (a device, fifo or socket): $odd" >&2
  exit 3; }
sum=$(printf '%s\n' "$list" | sha256sum) && sum=${sum%% *}
tar -c --format=pax -f - -C "$d" . || exit 4
printf 'shoal-rcopy-tree %s\n' "$sum" >&2
""".replace("LISTING", LISTING_SH)


def parse_size(text: str) -> int:
    found = _SIZE.fullmatch(text.strip())
    if not found:
        fail(f"--max-size {text!r}: give bytes or a size such as 512M or 4G", 2)
    return int(found.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[
        found.group(2).upper()]


def _targets(all_: bool, nodeset: str, exclude: str, groups: tuple[str, ...],
             xgroups: tuple[str, ...], labels: dict[str, str],
             ssh: SshChoice) -> m.Targets | None:
    """The agent side (None: only ssh hosts)."""
    if ssh.targets and not (all_ or ssh.nodes or groups or labels):
        return None
    with checking("targets"):
        return msgspec.convert({"all": all_, "nodes": group_refs(ssh.nodes, groups),
                                "exclude": group_refs(exclude, xgroups), "labels": labels},
                               m.Targets)


def _copy_options(f: Any) -> Any:
    for opt in reversed([
        target_options,
        click.option("-f", "--fanout", type=click.IntRange(min=1), default=None,
                     help="At most N nodes at once."),
        click.option("--max-size", default=DEFAULT_MAX, show_default=True,
                     help="Refuse files larger than this."),
        click.option("--connect-timeout", default=5.0, show_default=True, type=float,
                     help="Seconds to wait for each agent to answer."),
    ]):
        f = opt(f)
    return ssh_options(f)


def _run(targets: m.Targets | None, spec: dict[str, Any], fanout: int | None,
         connect_timeout: float, ssh: SshChoice, work: Any, **kwargs: Any) -> int:
    """``work``: the ssh hosts' part (``shoal.ssh.sftp``)."""
    from .run_cmd import run_command

    url, token, ca = ("", "", "")
    if targets is not None:
        cfg = client_config()
        url, token, ca = cfg.url, cfg.token, cfg.ca
    with checking("copy request"):
        run_spec = msgspec.convert(spec, m.RunSpec)
    leg = ssh.leg(work(), connect_timeout, fanout=fanout or 0,
                  takes_stdin=False) if ssh.targets else None
    return run_command(url, token, targets, run_spec, mode="prefixed", progress=True,
                       progress_label="rcopy" if "printer" in kwargs else "copy",
                       connect_timeout=connect_timeout, fanout=fanout or 0, ssh=leg, ca=ca,
                       **kwargs)


@main.command("copy")
@_copy_options
@click.option("-r", "--recursive", is_flag=True, help="SOURCE is a directory: copy the tree.")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest")
def copy(all_: bool, nodeset: str, exclude: str, groups: tuple[str, ...],
         xgroups: tuple[str, ...], labels: dict[str, str], fanout: int | None,
         max_size: str, connect_timeout: float, ssh_hosts: tuple[str, ...],
         inventory_path: Path | None, accept_new: bool, known_hosts: Path | None,
         recursive: bool, source: Path, dest: str) -> None:
    """Copy a file to many nodes: shoal copy -n 'web[1-8]' app.conf /etc/app/

    DEST may name a directory (the file keeps its name) and may contain {node}, each node's
    own name. Mode and mtime are kept; each node checks the sha256 before it renames the
    file into place, so a destination is either the old file or the whole new one.
    -H hosts get it over SFTP, with the same checks. -r copies a directory tree (modes,
    mtimes and symlinks kept; into DEST/NAME if DEST is a directory).
    """
    limit = parse_size(max_size)
    ssh = choose(nodeset, exclude, ssh_hosts, inventory_path, accept_new, known_hosts)
    targets = _targets(all_, nodeset, exclude, groups, xgroups, labels, ssh)
    if not dest or "\0" in dest:
        fail("give a destination path", 2)
    if recursive:
        sys.exit(_copy_tree(targets, ssh, source, dest, limit, fanout, connect_timeout))
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as e:
        fail(f"cannot read {source}: {e.strerror}", 2)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            fail(f"{source} is not a regular file (a directory: copy -r)", 2)
        if st.st_size > limit:
            fail(f"{source} is {st.st_size} bytes, over --max-size {max_size}", 2)
        digest = _sha256(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        argv = ["sh", "-c", PUSH, "shoal-copy", dest, digest,
                f"{stat.S_IMODE(st.st_mode):o}", str(int(st.st_mtime)), source.name]

        def work() -> Any:
            from ..ssh.sftp import push_work

            return push_work(source, dest, digest, stat.S_IMODE(st.st_mode), int(st.st_mtime))

        status = _run(targets, {"argv": argv, "stdin": targets is not None}, fanout,
                      connect_timeout, ssh, work, stdin_fd=fd,
                      progress_bytes="stdin" if targets is not None else "")
    finally:
        os.close(fd)
    sys.exit(status)


def _copy_tree(targets: m.Targets | None, ssh: SshChoice, source: Path,
               dest: str, limit: int, fanout: int | None, connect_timeout: float) -> int:
    """The tree as one tar stream (a temporary file, sent once), checked at each end."""
    import tempfile

    from ..logic.treecopy import TreeError, listing_sha256, write_tar

    if not source.is_dir():
        fail(f"{source} is not a directory (copy -r copies a tree; a file: copy)", 2)
    name = source.resolve().name
    with tempfile.NamedTemporaryFile(prefix="shoal-tree-", suffix=".tar") as tar:
        try:
            tree_digest = listing_sha256(source)
            write_tar(source, tar, limit)
        except TreeError as e:
            fail(str(e), 2)
        tar.flush()
        os.lseek(tar.fileno(), 0, os.SEEK_SET)
        tar_digest = _sha256(tar.fileno())
        os.lseek(tar.fileno(), 0, os.SEEK_SET)
        args = [dest, tar_digest, tree_digest, name]

        def work() -> Any:
            from ..ssh.sftp import script_work

            return script_work(PUSH_TREE, args, Path(tar.name))

        return _run(targets, {"argv": ["sh", "-c", PUSH_TREE, "shoal-copy", *args],
                                   "stdin": targets is not None}, fanout, connect_timeout,
                    ssh, work, stdin_fd=tar.fileno(),
                    progress_bytes="stdin" if targets is not None else "")


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


class _ToFiles(Prefixed):
    """Each node's stdout into ``DIR/.NAME.node.part``, renamed to ``DIR/NAME.node`` once the
    node has exited 0 and its sha256 matches the one it reported. ``tree``: the stdout is a
    tar stream, unpacked into ``DIR/.NAME.node.part.d`` and swapped into place as the
    directory ``DIR/NAME.node`` once its listing's sha256 matches the node's."""

    def __init__(self, directory: Path, name: str, limit: int, tree: bool = False) -> None:
        super().__init__()
        self.dir = directory
        self.name = name
        self.limit = limit
        self.tree = tree
        self._files: dict[str, tuple[Any, Any, int]] = {}  # node -> (file, hash, bytes)
        self._meta: dict[str, list[str]] = {}
        self._bad: dict[str, str] = {}

    def _part(self, node: str) -> Path:
        return self.dir / f".{self.name}.{node}.part"

    def output(self, ev: m.Output) -> None:
        if ev.stream == "stdout":
            if ev.node in self._bad:
                return
            if ev.node not in self._files:
                f = open(self._part(ev.node), "wb")  # noqa: SIM115 - closed in exited()
                self._files[ev.node] = (f, hashlib.sha256(), 0)
            f, h, size = self._files[ev.node]
            size += len(ev.data)
            if size > self.limit + (1 << 20):  # the tar stream's headers over the tree's size
                self._bad[ev.node] = f"more than the --max-size of {self.limit} bytes sent"
                return
            f.write(ev.data)
            h.update(ev.data)
            self._files[ev.node] = (f, h, size)
            return
        text = ev.data.decode(errors="replace")
        rest = []
        for line in text.splitlines(keepends=True):
            if line.startswith(("shoal-rcopy ", "shoal-rcopy-tree ")):
                self._meta[ev.node] = line.split()[1:]
            else:
                rest.append(line)
        if rest:
            self.err.write(prefix_lines(ev.node, [ln.rstrip("\n").encode() for ln in rest]))

    def settle(self, result: m.Exit | m.Unreachable) -> m.Exit | m.Unreachable:
        """Put the node's file or tree in place; a node whose copy failed here is failed
        (status 5, the reason said), whatever its exit code."""
        node = result.node
        f, h, _ = self._files.pop(node, (None, hashlib.sha256(), 0))
        if f is not None:
            f.close()
        part = self._part(node)
        ok = (isinstance(result, m.Exit) and result.code == 0 and node in self._meta
              and node not in self._bad)
        if ok and f is None:
            part.touch()  # an empty file sends no output
        if ok and self.tree:
            ok = self._place_tree(node, part, self._meta[node][0])
        elif ok:
            digest, mode, mtime = self._meta[node]
            if h.hexdigest() != digest:
                self._bad[node] = "sha256 mismatch (the file changed while it was read?)"
                ok = False
            else:
                os.chmod(part, int(mode, 8))
                os.utime(part, (int(mtime), int(mtime)))
                os.replace(part, self.dir / f"{self.name}.{node}")
        if not ok:
            part.unlink(missing_ok=True)
            if node in self._bad and isinstance(result, m.Exit):
                return msgspec.structs.replace(result, code=max(result.code or 0, 5),
                                               reason=self._bad[node])
        return result

    def _place_tree(self, node: str, tar: Path, digest: str) -> bool:
        from ..logic.treecopy import TreeError, listing, unpack

        tmp = self.dir / f".{self.name}.{node}.part.d"
        _remove(tmp)
        tmp.mkdir(mode=0o700)
        try:
            try:
                got = hashlib.sha256(listing(tmp, unpack(tar, tmp))).hexdigest()
            except TreeError as e:
                self._bad[node] = str(e)
                return False
            if got != digest:
                self._bad[node] = (f"tree listing mismatch: got {got}, expected {digest} "
                                   "(the tree changed while it was read?)")
                return False
            final = self.dir / f"{self.name}.{node}"
            if final.is_dir() and not final.is_symlink():
                old = self.dir / f".{self.name}.{node}.old"
                _remove(old)
                final.rename(old)
                tmp.rename(final)
                _remove(old)
            else:
                if final.is_symlink() or final.exists():
                    final.unlink()
                tmp.rename(final)
            return True
        finally:
            _remove(tmp)
            tar.unlink(missing_ok=True)

    def close(self) -> None:
        for node, (f, _, _) in self._files.items():
            f.close()
            self._part(node).unlink(missing_ok=True)
            _remove(self.dir / f".{self.name}.{node}.part.d")
        super().close()


def _remove(path: Path) -> None:
    """A tree we made, even one with directories we may not write into (mode 0500)."""
    import shutil

    def writable(fn: Any, p: str, exc: Any) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        fn(p)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=writable)
    elif path.is_symlink() or path.exists():
        path.unlink()


@main.command("rcopy")
@_copy_options
@click.option("-r", "--recursive", is_flag=True,
              help="SOURCE is a directory: gather the tree, one per node.")
@click.argument("source")
@click.argument("directory", type=click.Path(path_type=Path))
def rcopy(all_: bool, nodeset: str, exclude: str, groups: tuple[str, ...],
          xgroups: tuple[str, ...], labels: dict[str, str], fanout: int | None,
          max_size: str, connect_timeout: float, ssh_hosts: tuple[str, ...],
          inventory_path: Path | None, accept_new: bool, known_hosts: Path | None,
          recursive: bool, source: str, directory: Path) -> None:
    """Gather a file from many nodes: shoal rcopy --all /var/log/syslog ./logs

    Each node's copy lands in DIRECTORY as NAME.node (like clush --rcopy), mode and mtime
    kept, sha256 checked; SOURCE may contain {node}. -H hosts send it over SFTP. -r gathers
    a directory tree as the directory DIRECTORY/NAME.node (modes, mtimes and symlinks kept,
    checked by the sha256 of its listing).
    """
    limit = parse_size(max_size)
    ssh = choose(nodeset, exclude, ssh_hosts, inventory_path, accept_new, known_hosts)
    targets = _targets(all_, nodeset, exclude, groups, xgroups, labels, ssh)
    what = "tree" if recursive else "file"
    if not directory.is_dir():
        fail(f"{directory} is not a directory: rcopy writes one {what} per node into it", 2)
    if not os.access(directory, os.W_OK):
        fail(f"cannot write into {directory}", 2)
    name = Path(source.replace("{node}", "")).name
    if not name or name in (".", ".."):
        fail(f"{source!r} does not name a {'directory' if recursive else 'file'}", 2)
    script = PULL_TREE if recursive else PULL
    argv = ["sh", "-c", script, "shoal-rcopy", source, str(limit)]
    printer = _ToFiles(directory, name, limit, tree=recursive)

    def work() -> Any:
        if recursive:
            return _per_host_command(argv)
        from ..ssh.sftp import pull_work

        return pull_work(source, directory, name, limit)

    sys.exit(_run(targets, {"argv": argv}, fanout, connect_timeout, ssh, work,
                  printer=printer, progress_bytes="stdout"))


def _per_host_command(argv: list[str]) -> Any:
    """``argv`` on each ssh host, ``{node}`` in its path argument made the host's name (ssh
    hosts have no ``SHOAL_NODE``): the host's stdout and stderr come back as a run's do."""
    from ..ssh.fanout import command_work

    async def work(conn: Any, io: Any) -> m.Exit:
        mine = [*argv[:4], argv[4].replace("{node}", io.target.name), *argv[5:]]
        return await command_work(m.RunSpec(argv=mine))(conn, io)

    return work


main.add_command(copy, "cp")
main.add_command(rcopy, "rcp")
