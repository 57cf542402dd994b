"""Which stored output chunks a reader believes, from where they were published.

A node's credential may publish output only under its own name (``shoal.out.<id>.<node>``),
so the subject says which node wrote a chunk; the session record says which node ran each
attempt (``attempt_nodes``). A chunk of attempt ``e`` counts only if it came from the node of
attempt ``e``, and never after a chunk of a later attempt (what the attempt markers mean:
once attempt ``e`` writes, the earlier ones are over). Chunks stored under the old one-token
subject (node "") predate node names and are believed as before: no node credential may
publish there.
"""

from __future__ import annotations

from collections.abc import Sequence

LEGACY = ""  # the node of a chunk stored under the old one-token subject


def from_its_node(nodes: Sequence[str] | None, node: str, epoch: int) -> bool:
    """Did ``node`` run attempt ``epoch``? ``nodes`` None: no record to judge by (a writer
    on the shared agent credential, which may write every node's output anyway)."""
    if node == LEGACY or nodes is None:
        return True
    return 1 <= epoch <= len(nodes) and nodes[epoch - 1] == node


class Trust:
    """A reader's judgement over one pass through a session's chunks, in stream order."""

    def __init__(self, nodes: Sequence[str] | None) -> None:
        self.nodes = nodes
        self.epoch = 0  # the latest attempt seen writing

    def knows(self, epoch: int) -> bool:
        """Does the record this judges by know attempt ``epoch`` (else read it again)?"""
        return self.nodes is None or epoch <= len(self.nodes)

    def accept(self, node: str, epoch: int) -> bool:
        if not from_its_node(self.nodes, node, epoch) or epoch < self.epoch:
            return False
        self.epoch = epoch
        return True
