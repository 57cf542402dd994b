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
    known = NodeSet(nodes) if targets.nodes or targets.exclude else NodeSet()
    chosen: set[str] = set()
    if targets.all or (targets.labels and not targets.nodes):
        chosen |= {n for n, info in nodes.items() if info.state != "down"}
    if targets.nodes:
        named = _parse(targets.nodes, "-n", resolver)
        unknown = named - known  # set algebra on ranges: n[1-1000000] costs nothing here
        if unknown:
            raise NotFoundError(
                f"unknown node(s): {unknown}; `shoal nodes` lists the known ones")
        chosen |= set(named)
    if targets.exclude:
        chosen -= set(_parse(targets.exclude, "-x", resolver) & known)
    for key, value in targets.labels.items():
        chosen = {n for n in chosen if nodes[n].labels.get(key) == value}
    if not chosen:
        raise NotFoundError("the selection matched no node; `shoal nodes` lists the nodes")
    return sorted(chosen, key=natural_key)
