"""Print which packages `make lock` added, removed or moved between two uv.lock files."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def versions(path: str) -> dict[str, str]:
    lock = tomllib.loads(Path(path).read_text())
    return {p["name"]: p.get("version", "?") for p in lock.get("package", [])}


def main(before_path: str, after_path: str) -> None:
    before, after = versions(before_path), versions(after_path)
    changes = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old != new:
            changes.append(f"  {name}: {old or '(new)'} -> {new or '(removed)'}")
    print("\n".join(changes) if changes else "uv.lock: nothing changed")
    if changes:
        print("run `make test`; commit uv.lock only with it green")


if __name__ == "__main__":
    main(*sys.argv[1:3])
