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


def listing(root: Path) -> bytes:
    """The canonical listing of the tree at ``root`` (TreeError for what cannot be sent)."""
    lines = []
    for rel, full in _entries(root):
        if "\n" in rel:
            raise TreeError(f"{full!r}: a name with a newline cannot be copied")
        try:
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                lines.append(f"l {rel} -> {os.readlink(full)}")
            elif stat.S_ISDIR(st.st_mode):
                lines.append(f"d {stat.S_IMODE(st.st_mode):o} {int(st.st_mtime)} {rel}")
            elif stat.S_ISREG(st.st_mode):
                lines.append(f"f {stat.S_IMODE(st.st_mode):o} {int(st.st_mtime)} "
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


def safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Extraction filter: tarfile's ``tar`` checks (nothing outside ``dest``, not even
    through a link made earlier) but modes as sent and no owners (the files are ours)."""
    import tarfile

    checked = tarfile.tar_filter(member, dest)
    return checked.replace(mode=member.mode, uid=None, gid=None, uname=None,  # type: ignore[arg-type]
                           gname=None, deep=False)  # type: ignore[arg-type]
