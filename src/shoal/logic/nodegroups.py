"""Node groups (``@compute``, ``@rack1``, ``@role=web``) from ClusterShell's group files and
from node labels.

Files, read as ClusterShell reads them, so existing ones work unchanged:

- ``groups.d/*.yaml`` (or one such file): ``source: {group: nodeset}``; a value is node set
  text (which may name other groups) or a list of such texts;
- ``groups.conf`` (INI): ``[Main] default`` picks the default source and ``autodir`` the YAML
  directories (``$CFGDIR`` is the file's directory); a source whose ``map`` upcall is the
  stock ``sed ... FILE`` is read as the flat file it names. No other upcall is run: a
  controller never executes commands from a configuration file;
- a flat ``groups`` file: ``name: nodeset`` per line, ``#`` comments (source ``local``).

Labels: ``@key=value`` is every node whose label ``key`` is ``value``; ``@name`` that no file
defines is every node whose ``group`` label lists ``name`` (comma-separated). ``@*`` is
the ``all`` group of the source, else every group it defines and every node of the fleet.

Parsing and resolution are pure; only ``load`` touches the file system.
"""

from __future__ import annotations

import configparser
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .nodeset import NodeSet, NodeSetError

__all__ = ["Groups", "GroupsError", "GroupsFile", "load"]

MAX_DEPTH = 16
MAX_FILE = 4 << 20
_GROUP_NAME = re.compile(r"[A-Za-z0-9._/-]+")
GROUP_LABEL = "group"


class GroupsError(ValueError):
    """A groups file that cannot be read."""


@dataclass(frozen=True)
class Groups:
    """Group definitions by source, plus the fleet's node labels for label groups."""

    sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    default: str = ""
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # node -> labels

    def with_labels(self, labels: Mapping[str, Mapping[str, str]]) -> Groups:
        return Groups(self.sources, self.default, labels)

    def names(self, source: str | None = None) -> list[str]:
        """Group names of one source (default: the default one), for ``nodeset -l``."""
        src = self.sources.get(source or self.default, {})
        from_labels = {g for lab in self.labels.values()
                       for g in _listed(lab.get(GROUP_LABEL, ""))} if source is None else set()
        return sorted(set(src) | from_labels)

    def parse(self, text: str) -> NodeSet:
        """Node set text with ``@group`` operands resolved."""
        return NodeSet.parse(text, groups=lambda ref: self._resolve(ref, 0))

    def _resolve(self, ref: str, depth: int) -> NodeSet:
        if depth >= MAX_DEPTH:
            raise NodeSetError(f"group @{ref} nests deeper than {MAX_DEPTH} (a cycle?)")
        source, _, name = ref.rpartition(":") if ":" in ref else ("", "", ref)
        src_name = source or self.default
        if source and source not in self.sources:
            raise NodeSetError(f"unknown group source {source!r} in @{ref}; sources: "
                               f"{', '.join(sorted(self.sources)) or 'none configured'}")
        defs = self.sources.get(src_name, {})
        if "=" in name and not source:
            key, _, value = name.partition("=")
            return NodeSet(n for n, lab in self.labels.items() if lab.get(key) == value)
        if name == "*":  # the source's "all" group, else all it defines (and the fleet)
            if "all" not in defs:
                every = _union_all(self, src_name, depth)
                return every if source else every | NodeSet(self.labels)
            name = "all"
        if name in defs:
            prefix = f"{source}:" if source else ""
            return NodeSet.parse(defs[name], groups=lambda r: self._resolve(
                r if ":" in r or not prefix else prefix + r, depth + 1))
        members = NodeSet(n for n, lab in self.labels.items()
                          if name in _listed(lab.get(GROUP_LABEL, ""))) if not source else None
        if not members:
            raise NodeSetError(f"unknown group @{ref}: not in the groups file"
                               f"{'' if source else ' nor a group label of any node'}")
        return members


def _union_all(groups: Groups, source: str, depth: int) -> NodeSet:
    out = NodeSet()
    for name in groups.sources.get(source, {}):
        out = out | groups._resolve(f"{source}:{name}", depth + 1)
    return out


def _listed(value: str) -> list[str]:
    return [g.strip() for g in value.split(",") if g.strip()]


# --------------------------------------------------------------------------- files


def load(path: str | Path) -> Groups:
    """Read a groups.conf, a groups.d directory, one YAML file or a flat groups file."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _from_sources(_yaml_dir(p), "")
    if not p.is_file():
        raise GroupsError(f"groups file {p} does not exist")
    text = _read(p)
    if p.suffix in (".yaml", ".yml"):
        return _from_sources(_yaml(text, p), "")
    if p.suffix == ".conf" or text.lstrip().startswith("["):
        return _conf(text, p)
    return _from_sources({"local": _flat(text, p)}, "local")


def _read(p: Path) -> str:
    if p.stat().st_size > MAX_FILE:
        raise GroupsError(f"groups file {p} is larger than {MAX_FILE >> 20} MiB")
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise GroupsError(f"cannot read groups file {p}: {e}") from e


def _from_sources(sources: dict[str, dict[str, str]], default: str) -> Groups:
    if not default:
        default = "local" if "local" in sources else next(iter(sorted(sources)), "")
    return Groups(sources, default)


def _check(name: str, where: Path) -> str:
    if not _GROUP_NAME.fullmatch(name):
        raise GroupsError(f"bad group name {name!r} in {where}: use letters, digits, . _ / -")
    return name


def _flat(text: str, where: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, nodes = line.partition(":")
        if not sep:
            raise GroupsError(f"{where}:{lineno}: expected 'name: nodeset'")
        out[_check(name.strip(), where)] = nodes.strip()
    return out


def _yaml(text: str, where: Path) -> dict[str, dict[str, str]]:
    import msgspec.yaml  # PyYAML's safe loader, only when a YAML groups file is configured

    try:
        data = msgspec.yaml.decode(text)
    except msgspec.DecodeError as e:
        raise GroupsError(f"{where}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GroupsError(f"{where}: expected 'source: {{group: nodeset}}' mappings")
    out: dict[str, dict[str, str]] = {}
    for source, groups in data.items():
        if not isinstance(groups, dict):
            raise GroupsError(f"{where}: source {source!r} must map group names to node sets")
        defs = out.setdefault(_check(str(source), where), {})
        for name, value in groups.items():
            defs[_check(str(name), where)] = _value(value, where, name)
    return out


def _value(value: object, where: Path, name: object) -> str:
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return ",".join(str(v) for v in value)
    raise GroupsError(f"{where}: group {name!r} must be node set text or a list of it")


def _yaml_dir(d: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
        for source, defs in _yaml(_read(f), f).items():
            out.setdefault(source, {}).update(defs)
    return out


def _conf(text: str, where: Path) -> Groups:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(where))
    except configparser.Error as e:
        raise GroupsError(f"{where}: not a valid groups.conf: {e}") from e
    cfgdir = str(where.parent)
    sources: dict[str, dict[str, str]] = {}
    main = parser["Main"] if parser.has_section("Main") else {}
    for d in _dirs(main.get("autodir", ""), cfgdir):
        for source, defs in _yaml_dir(d).items():
            sources.setdefault(source, {}).update(defs)
    for section in parser.sections():
        if section == "Main":
            continue
        flat = _sed_file(parser[section].get("map", ""))
        if flat is not None and flat.is_file():
            for name in section.split(","):
                sources.setdefault(name.strip(), {}).update(_flat(_read(flat), flat))
    return _from_sources(sources, main.get("default", "").strip())


def _dirs(value: str, cfgdir: str) -> Iterable[Path]:
    for d in value.split():
        p = Path(d.replace("$CFGDIR", cfgdir))
        if p.is_dir():
            yield p


def _sed_file(command: str) -> Path | None:
    """The file of ClusterShell's stock ``sed -n 's/^$GROUP:\\(.*\\)/\\1/p' FILE`` upcall."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if len(words) >= 3 and words[0] == "sed" and words[-1].startswith("/"):
        return Path(words[-1])
    return None


class GroupsFile:
    """A configured groups path, read again when it changes (as ClusterShell reads its
    files on each command), so an edited file takes effect on the next run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._groups = Groups()

    def get(self) -> Groups:
        if not self.path:
            return self._groups
        p = Path(self.path).expanduser()
        try:
            st = p.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError as e:
            raise GroupsError(f"groups file {p}: {e.strerror}") from e
        if stamp != self._stamp or p.is_dir():
            self._groups = load(p)
            self._stamp = stamp
        return self._groups
