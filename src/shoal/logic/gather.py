"""Gather identical per-node outputs, like ``clush -b``.

Output arrives in chunks per node; once a node is finished its output is stored
in a table keyed by content digest, so a thousand nodes printing the same thing
cost one copy of it.
"""

from __future__ import annotations

import hashlib

from shoal.logic.nodeset import NodeSet, natural_key

__all__ = ["OutputGatherer"]


def _digest(data: bytes | bytearray) -> bytes:
    # A 256-bit digest makes accidental merging of different outputs implausible.
    return hashlib.blake2b(data, digest_size=32).digest()


class OutputGatherer:
    """Collect output chunks per node and group nodes with identical output."""

    def __init__(self) -> None:
        self._pending: dict[str, bytearray] = {}  # node -> output still growing
        self._finished: dict[str, bytes] = {}  # node -> digest of its output
        self._outputs: dict[bytes, bytes] = {}  # digest -> shared output
        self._refs: dict[bytes, int] = {}  # digest -> number of finished nodes

    def _check_new(self, node: str) -> None:
        if node not in self._pending and node not in self._finished:
            NodeSet((node,))  # fail at the source rather than later in groups()

    def add(self, node: str, data: bytes) -> None:
        """Append a chunk of output for ``node`` (b"" just registers the node)."""
        self._check_new(node)
        buf = self._pending.get(node)
        if buf is None:
            if node in self._finished:
                # Late output after finish(): reopen the node from its stored copy.
                buf = bytearray(self._release(node))
            else:
                buf = bytearray()
            self._pending[node] = buf
        buf += data

    def finish(self, node: str) -> None:
        """Mark ``node`` complete and move its output into the shared table."""
        self._check_new(node)
        if node in self._finished:
            return
        buf = self._pending.pop(node, bytearray())
        key = _digest(buf)
        if key not in self._outputs:
            self._outputs[key] = bytes(buf)
        self._refs[key] = self._refs.get(key, 0) + 1
        self._finished[node] = key

    def finish_all(self) -> None:
        """Finish every node that still has a pending buffer."""
        for node in list(self._pending):
            self.finish(node)

    def _release(self, node: str) -> bytes:
        key = self._finished.pop(node)
        data = self._outputs[key]
        self._refs[key] -= 1
        if not self._refs[key]:
            # Drop outputs no finished node refers to, keeping memory bounded.
            del self._refs[key]
            del self._outputs[key]
        return data

    def nodes(self) -> NodeSet:
        """Every node seen so far, finished or not."""
        return NodeSet([*self._pending, *self._finished])

    def output(self, node: str) -> bytes:
        """Full output of one node so far (b"" if unknown)."""
        if node in self._finished:
            return self._outputs[self._finished[node]]
        return bytes(self._pending.get(node, b""))

    def groups(self) -> list[tuple[bytes, NodeSet]]:
        """Distinct outputs with their nodes, ordered by each group's first node.

        Unfinished nodes are included with their output so far.
        """
        members: dict[bytes, list[str]] = {}
        for node, key in self._finished.items():
            members.setdefault(key, []).append(node)
        pending_outputs: dict[bytes, bytes] = {}
        for node, buf in self._pending.items():
            key = _digest(buf)
            if key not in self._outputs:
                pending_outputs.setdefault(key, bytes(buf))
            members.setdefault(key, []).append(node)
        result: list[tuple[bytes, NodeSet]] = []
        for key, nodes in members.items():
            data = self._outputs[key] if key in self._outputs else pending_outputs[key]
            result.append((data, NodeSet(nodes)))
        result.sort(key=lambda item: natural_key(next(iter(item[1]))))
        return result
