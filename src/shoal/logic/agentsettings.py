"""The agent settings that need more than a type to check (agent.toml): UID ranges, networks,
``run_as`` user names. Pure, so the config loader checks them without importing the agent."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

from ..wire import messages as m

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
THROWAWAY_PREFIX = "shoal-"  # the names of sessions' throwaway users start so


def parse_uid_range(text: str) -> tuple[int, int]:
    """``"A-B"`` -> (A, B); a range of UIDs that no real account uses."""
    first, sep, last = text.strip().partition("-")
    try:
        lo, hi = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"UID range {text!r} is not A-B (e.g. 1900000000-1999999999)") from None
    if not 1000 <= lo <= hi <= 2**31 - 1:
        raise ValueError(f"UID range {text!r} must lie within 1000-2147483647, first <= last")
    return lo, hi


def parse_networks(items: list[str]) -> tuple[Network, ...]:
    """Addresses or CIDR networks (``10.0.0.0/8``, ``fd00::/8``, ``192.0.2.7``)."""
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network; write it like "
                             f"10.0.0.0/8, fd00::/8 or 192.0.2.7") from None
    return tuple(out)


def check_run_as(names: Collection[str]) -> None:
    """``run_as`` in agent.toml: plain Unix user names, none of them a throwaway user's."""
    for n in names:
        if not re.fullmatch(m.UNIX_USER_PATTERN, n):
            raise ValueError(f"run_as: {n!r} is not a Unix user name")
        if n.startswith(THROWAWAY_PREFIX):
            raise ValueError(f"run_as: {n!r}: names starting with {THROWAWAY_PREFIX!r} are "
                             "throwaway users of sessions")
