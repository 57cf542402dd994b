"""Choosing the nodes of a run from a snapshot of the registry (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import NotFoundError, ValidationError
from ..wire.messages import NodeInfo, Targets
from .nodegroups import Groups
from .nodeset import NodeSet, NodeSetError, natural_key


def _parse(text: str, flag: str, groups: Groups) -> NodeSet:
    try:
        return groups.parse(text)
    except NodeSetError as e:
        raise ValidationError(f"bad node set for {flag}: {e}") from e


def select(targets: Targets, nodes: Mapping[str, NodeInfo],
           groups: Groups | None = None) -> list[str]:
    """The names a run goes to, in natural order.

    ``all`` means every node that is up (ready or draining); nodes named explicitly are
    taken even when down (they will be reported unreachable). ``@group`` operands resolve
    from ``groups`` (a groups file) and from the nodes' labels. Unknown names and an empty
    selection are errors, never a silent no-op.
    """
    if not (targets.all or targets.nodes or targets.labels):
        raise ValidationError("no targets: give --all, -n NODESET, -g GROUP or -l key=value")
    resolver = (groups or Groups()).with_labels({n: info.labels for n, info in nodes.items()})
    known = _Known(nodes)
    chosen: set[str] = set()
    if targets.all or (targets.labels and not targets.nodes):
        chosen |= {n for n, info in nodes.items() if info.state != "down"}
    if targets.nodes:
        named = _parse(targets.nodes, "-n", resolver)
        unknown = known.missing(named)
        if unknown:
            raise NotFoundError(
                f"unknown node(s): {unknown}; `shoal nodes` lists the known ones")
        chosen |= set(named)
    if targets.exclude:
        chosen -= known.present(_parse(targets.exclude, "-x", resolver))
    for key, value in targets.labels.items():
        chosen = {n for n in chosen if nodes[n].labels.get(key) == value}
    if not chosen:
        raise NotFoundError("the selection matched no node; `shoal nodes` lists the nodes")
    return sorted(chosen, key=natural_key)


class _Known:
    """The registered names, asked about a NodeSet the cheaper way round: by looking up
    each of its names when it is the smaller (a 1,000-node subset of 10,000 registered: no
    NodeSet of all 10,000 built per run), by set algebra on ranges when it is the larger
    (``n[1-1000000]`` costs nothing)."""

    def __init__(self, nodes: Mapping[str, NodeInfo]) -> None:
        self.nodes = nodes
        self._all: NodeSet | None = None

    def _set(self) -> NodeSet:
        if self._all is None:
            self._all = NodeSet(self.nodes)
        return self._all

    def missing(self, names: NodeSet) -> NodeSet:
        if len(names) <= len(self.nodes):
            return NodeSet([n for n in names if n not in self.nodes])
        return names - self._set()

    def present(self, names: NodeSet) -> set[str]:
        if len(names) <= len(self.nodes):
            return {n for n in names if n in self.nodes}
        return set(names & self._set())
