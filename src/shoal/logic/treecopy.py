"""Directory trees for ``shoal copy -r`` / ``rcopy -r``: a tar stream of the tree, and a
canonical listing whose sha256 both ends compute to check the tree that arrived.

The listing has one line per entry, sorted by path bytes (as ``LC_ALL=C sort``), paths
relative to the tree's top (``.``, ``./a``, ``./a/b``)::

    d MODE MTIME PATH            directory
    f MODE MTIME SHA256 PATH     regular file (hard links: each name as a file)
    l PATH -> TARGET             symbolic link, kept as a link, never followed

MODE is ``stat -c %a`` (octal, no leading zero), MTIME whole seconds. ``LISTING_SH`` is
the same listing in POSIX sh (find, stat, sha256sum, readlink), for the far end.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import tarfile

LISTING_SH = r"""find . | LC_ALL=C sort | while IFS= read -r p; do
  if [ -L "$p" ]; then printf 'l %s -> %s\n' "$p" "$(readlink -- "$p")"
  elif [ -d "$p" ]; then printf 'd %s %s\n' "$(stat -c '%a %Y' -- "$p")" "$p"
  elif [ -f "$p" ]; then s=$(sha256sum < "$p") || exit 1
    printf 'f %s %s %s\n' "$(stat -c '%a %Y' -- "$p")" "${s%% *}" "$p"
  else printf 'o %s\n' "$p"; fi
done"""


class TreeError(Exception):
    pass


def _entries(root: Path) -> Iterator[tuple[str, Path]]:
    """(listing path, real path) of every entry, top first, never through a symlink."""
    yield ".", root
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_raise):
        for name in (*dirnames, *filenames):
            full = Path(dirpath, name)
            yield "./" + full.relative_to(root).as_posix(), full


def _raise(e: OSError) -> None:
    raise TreeError(f"cannot read {e.filename}: {e.strerror}")


def listing(root: Path, modes: dict[str, int] | None = None) -> bytes:
    """The canonical listing of the tree at ``root`` (TreeError for what cannot be sent).
    ``modes``: the mode to list for these paths instead of the one on disk (``unpack``'s
    dropped set-id bits)."""
    modes = modes or {}
    lines = []
    for rel, full in _entries(root):
        if "\n" in rel:
            raise TreeError(f"{full!r}: a name with a newline cannot be copied")
        try:
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                lines.append(f"l {rel} -> {os.readlink(full)}")
            elif stat.S_ISDIR(st.st_mode):
                mode = modes.get(rel, stat.S_IMODE(st.st_mode))
                lines.append(f"d {mode:o} {int(st.st_mtime)} {rel}")
            elif stat.S_ISREG(st.st_mode):
                mode = modes.get(rel, stat.S_IMODE(st.st_mode))
                lines.append(f"f {mode:o} {int(st.st_mtime)} "
                             f"{_file_sha256(full)} {rel}")
            else:
                raise TreeError(f"{full} is not a file, directory or symlink (a device, "
                                "fifo or socket): leave it out of the tree")
        except OSError as e:
            raise TreeError(f"cannot read {full}: {e.strerror}") from e
    return _sort(lines)


def _sort(lines: list[str]) -> bytes:
    def path(line: str) -> bytes:
        kind, rest = line[0], line[2:]
        if kind == "l":
            return os.fsencode(rest.split(" -> ", 1)[0])
        return os.fsencode(rest.split(" ", 3 if kind == "f" else 2)[-1])

    return b"".join(os.fsencode(x) + b"\n" for x in sorted(lines, key=path))


def listing_sha256(root: Path) -> str:
    return hashlib.sha256(listing(root)).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_tar(root: Path, out: IO[bytes], limit: int) -> None:
    """The tree as a tar stream (PAX), entries named like the listing, whole-second mtimes,
    symlinks as links. TreeError past ``limit`` bytes."""
    import tarfile  # here: `shoal run` imports this module (LISTING_SH) and never tars

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, full in _entries(root):
            info = tar.gettarinfo(str(full), arcname=rel)
            info.mtime = int(info.mtime)
            if info.isreg():
                with open(full, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if out.tell() > limit:
                raise TreeError(f"{root} is over --max-size ({limit} bytes) as a tar stream")


def unpack(tar_path: Path, dest: Path) -> dict[str, int]:
    """Unpack a tar stream a node sent (``rcopy -r``) into the empty directory ``dest``:
    regular files, directories, symlinks (kept as links, whatever they point to) and hard
    links within the tree; modes and mtimes as sent, owners not (the files are ours), set-id
    bits dropped. Returns the listing path and sent mode of each entry whose set-id bits were
    dropped (for ``listing``). TreeError for anything else, which leaves ``dest`` partial
    (the caller removes it)."""
    import tarfile

    dropped: dict[str, int] = {}
    top = os.path.realpath(dest)

    def member(m: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        # tarfile's "tar" filter: the name stays inside dest, not even through a link
        # unpacked earlier; what it leaves to us: the kinds, hard links, names seen twice.
        try:
            checked = tarfile.tar_filter(m, path)
        except tarfile.FilterError as e:
            raise TreeError(f"refused {m.name!r}: {e}") from e
        norm = posixpath.normpath(checked.name)
        rel = "." if norm == "." else "./" + norm
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise TreeError(f"refused {m.name!r}: not a file, directory or symlink")
        if rel != "." and os.path.lexists(os.path.join(top, rel)):
            raise TreeError(f"refused {m.name!r}: named twice in the stream")
        if m.islnk():
            target = os.path.realpath(os.path.join(top, m.linkname))
            if (os.path.isabs(m.linkname) or os.path.commonpath([target, top]) != top
                    or not os.path.isfile(target)):
                raise TreeError(f"refused {m.name!r}: a hard link to {m.linkname!r}, "
                                "outside the tree")
        mode = m.mode & 0o7777
        if mode & (stat.S_ISUID | stat.S_ISGID) and not m.issym():
            dropped[rel] = mode
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return checked.replace(mode=mode, uid=None, gid=None, uname=None,  # type: ignore[arg-type]
                               gname=None, deep=False)  # type: ignore[arg-type]

    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            tar.extractall(dest, filter=member)
    except (tarfile.TarError, OSError) as e:  # a TreeError from member() passes through
        raise TreeError(f"cannot unpack the tree: {e}") from e
    return dropped


def safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Extraction filter: tarfile's ``tar`` checks (nothing outside ``dest``, not even
    through a link made earlier) but modes as sent and no owners (the files are ours)."""
    import tarfile

    checked = tarfile.tar_filter(member, dest)
    return checked.replace(mode=member.mode, uid=None, gid=None, uname=None,  # type: ignore[arg-type]
                           gname=None, deep=False)  # type: ignore[arg-type]
