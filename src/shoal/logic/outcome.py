"""How a fan-out run ended, as one exit status and one summary line (pure logic)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..wire.messages import Exit, Unreachable
from .nodeset import NodeSet

UNREACHABLE = 255


def node_status(result: Exit | Unreachable) -> int:
    """A node's exit status as a shell would give it."""
    if isinstance(result, Unreachable) or result.timed_out:
        return UNREACHABLE
    if result.signal is not None:
        return 128 + result.signal
    return result.code if result.code is not None else UNREACHABLE


@dataclass(frozen=True)
class Outcome:
    status: int
    summary: str  # empty when every node exited 0


def summarize(results: dict[str, Exit | Unreachable], missing: Iterable[str] = (),
              skipped: Mapping[str, str] | None = None) -> Outcome:
    """0 if every node exited 0, else the largest node status; the summary names every node
    that failed, timed out or was unreachable, and those a rolling run did not start."""
    missing = list(missing)
    skipped = skipped or {}
    failed: dict[int, list[str]] = {}
    timed_out: list[str] = []
    unreachable: list[str] = list(missing)
    for node, r in results.items():
        if isinstance(r, Unreachable):
            unreachable.append(node)
        elif r.timed_out:
            timed_out.append(node)
        elif node_status(r) != 0:
            failed.setdefault(node_status(r), []).append(node)
    statuses = [node_status(r) for r in results.values()] + [UNREACHABLE for _ in missing]
    status = max(statuses, default=0)
    parts = [f"exit {code}: {NodeSet(nodes)}" for code, nodes in sorted(failed.items())]
    if timed_out:
        parts.append(f"timed out: {NodeSet(timed_out)}")
    if unreachable:
        parts.append(f"unreachable: {NodeSet(unreachable)}")
    by_reason: dict[str, list[str]] = {}
    for node, reason in skipped.items():
        by_reason.setdefault(reason, []).append(node)
    parts.extend(f"{reason}: {NodeSet(nodes)}" for reason, nodes in sorted(by_reason.items()))
    if skipped and not status:
        status = UNREACHABLE  # nodes were left out: never report success
    ok = len(results) - sum(len(v) for v in failed.values()) - len(timed_out) \
        - (len(unreachable) - len(missing))
    summary = ""
    if parts:
        summary = f"shoal: {ok} ok; " + "; ".join(parts)
    return Outcome(status, summary)
