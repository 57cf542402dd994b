"""Enrollment of nodes with a join token, and their credentials' renewal (docs/security.md,
"Node identities"): the messages, and what a node name may be."""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta, Struct

# One NATS subject token (no dot, no wildcard, no space), starting with a letter or digit
# (so no name can look like a heartbeat host key, ``_h-...``).
NODE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_NODE_NAME = re.compile(NODE_NAME)
MAX_NAMES = 64  # node names one credential (one agent process) may serve
JOIN_PREFIX = "shoal-join_"


def node_name_problem(name: str) -> str:
    """Why ``name`` cannot be a node's name, or "" when it can."""
    if _NODE_NAME.match(name):
        return ""
    return (f"node name {name!r}: letters, digits, _ and -, starting with a letter or digit, "
            "up to 63 characters")


class NewJoinToken(Struct, forbid_unknown_fields=True):
    """``POST /api/v1/join-tokens``: a token that enrolls up to ``uses`` nodes."""

    expires: Annotated[float, Meta(gt=0, le=366 * 86400)] = 3600.0  # seconds from now
    uses: Annotated[int, Meta(ge=1, le=100000)] = 1  # node names it may enroll, in all
    labels: dict[str, str] = {}  # fixed for every node it enrolls (bound in the credential)
    name: str = ""  # the one node name it may enroll ("" = the node says)


class JoinToken(Struct):
    id: str
    token: str  # shown once; the controllers keep only its hash
    expires: float  # epoch seconds
    uses: int
    labels: dict[str, str]
    name: str


class EnrollRequest(Struct, forbid_unknown_fields=True):
    """``POST /api/v1/enroll`` (no bearer token: the join token is the proof)."""

    token: str
    public_key: str  # the node's nkey (``U...``); its private key stays on the node
    names: list[str]
    labels: dict[str, str] = {}


class EnrollReply(Struct):
    jwt: str  # the node's user JWT, signed by the fleet's account key
    nats_url: str  # where the controllers reach NATS (the node may know better)
    names: list[str]
    labels: dict[str, str]
    expires: float


class RenewReply(Struct):
    jwt: str = ""
    error: str = ""  # why not: revoked, unknown
