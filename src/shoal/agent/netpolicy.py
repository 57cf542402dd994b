"""Network policy for throwaway users: what their sockets may connect to.

The agent owns one nftables table (``inet`` family, so IPv4 and IPv6) whose output chain
matches sockets by their owner's UID (``meta skuid``) over the throwaway users' UID range.
Modes (``ephemeral_network`` in agent.toml):

- ``none``: no new connection anywhere (TCP is reset, so ``connect`` fails with "connection
  refused"; other protocols are dropped, so ``send`` fails with "operation not permitted").
- ``outbound``: anything except this node itself (every packet to a local address, loopback or
  not, leaves through ``lo``), the NATS servers the agent uses, and ``ephemeral_deny``.
  DNS to a local resolver (port 53 on ``lo``) stays open.
- ``open``: no rules (the throwaway user reaches what any user of the node reaches).

Only connections the throwaway user *starts* are stopped: a TCP SYN without ACK, or any
non-TCP packet. Replies from its own listeners (a replica the proxy connects to) pass.

Recreate-on-start: one ``nft -f`` transaction declares the table, deletes it and writes it
anew, so a start after a crash replaces what was left (never duplicates it) and the rules
are never absent in between. A clean stop deletes the table; after a SIGKILL it stays in
force until the next start.

Rule text is built by pure functions (tested without root); applying it is :func:`apply`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from ..logic.agentsettings import Network as Network
from ..logic.agentsettings import parse_networks as parse_networks
from ..logic.agentsettings import parse_uid_range as parse_uid_range

if TYPE_CHECKING:
    from ..config import AgentConfig

log = logging.getLogger(__name__)

Mode = Literal["none", "outbound", "open"]
MODES: tuple[Mode, ...] = ("none", "outbound", "open")

# What NodeInfo.network says when rules that were asked for are not in force.
UNENFORCED = "unenforced"


class PolicyError(Exception):
    """The policy could not be applied (the message says why and what to do)."""


# --------------------------------------------------------------------------- parsing


def nats_addresses(urls: str) -> tuple[Network, ...]:
    """The addresses of the NATS servers in a (comma-separated) URL list, resolved now."""
    out: set[Network] = set()
    for url in urls.split(","):
        host = urlsplit(url.strip() if "://" in url else f"nats://{url.strip()}").hostname
        if not host:
            continue
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as e:
            log.warning("network policy: cannot resolve NATS host %s (%s); add its address "
                        "to ephemeral_deny", host, e)
            continue
        for info in infos:
            out.add(ipaddress.ip_network(info[4][0]))
    return tuple(sorted(out, key=lambda n: (n.version, n)))


# --------------------------------------------------------------------------- rule text


def table_name(state_dir: str | Path, node: str) -> str:
    """One table per agent (agents on one host stop independently); stable across restarts
    of the same agent, so a start replaces what its crashed predecessor left."""
    digest = hashlib.sha256(f"{Path(state_dir).resolve()}\0{node}".encode()).hexdigest()[:8]
    return f"shoal_{re.sub(r'[^A-Za-z0-9_]', '_', node)[:32]}_{digest}"


@dataclass(frozen=True)
class Policy:
    mode: Mode
    uids: tuple[int, int]
    table: str
    owner: str = ""  # said in the table's comment, for whoever runs `nft list ruleset`
    deny: tuple[Network, ...] = ()  # refused in ``outbound`` mode too

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"network mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", self.table):
            raise ValueError(f"bad nftables table name {self.table!r}")


async def for_agent(cfg: AgentConfig, state_dir: Path, node: str) -> Policy:
    """The policy an agent's config asks for (NATS hosts resolved now, for ``outbound``)."""
    deny = parse_networks(cfg.ephemeral_deny)
    if cfg.ephemeral_network == "outbound":
        deny += await asyncio.to_thread(nats_addresses, cfg.nats.url)
    return Policy(cfg.ephemeral_network, parse_uid_range(cfg.ephemeral_uids),
                  table_name(state_dir, node), owner=owner(node, state_dir),
                  deny=tuple(dict.fromkeys(deny)))


_STATE = re.compile(r'^table inet (shoal_\w+) \{\n\tcomment "[^"\n]*; state (/[^"\n]*)"$',
                    re.MULTILINE)


COMMENT_MAX = 128  # nftables' limit in bytes: one more and the whole table is refused


def _comment(mode: str, owner: str) -> str:
    return f"shoal: throwaway users network={mode}; {owner}"


def owner(node: str, state_dir: Path) -> str:
    """Who owns a table, for its comment. The state directory is named only when it can be
    read back exactly (so :func:`orphans` never mistakes a live agent's table), and the node
    only when the comment still fits nftables' limit for the longest mode."""
    path = str(Path(state_dir).resolve())
    candidates = [f"agent {node[:40]}"]
    if not re.search(r'["\\\n]', path):
        candidates[:0] = [f"agent {node[:40]}; state {path}", f"state {path}"]
    longest = max(MODES, key=len)
    return next(c for c in candidates if len(_comment(longest, c).encode()) <= COMMENT_MAX)


def orphans(listing: str, exists: Callable[[str], bool] = os.path.isdir) -> list[str]:
    """Tables in ``nft list ruleset`` output left by agents whose state directory is gone
    (killed and never started again): nothing will ever replace or remove them."""
    return [m.group(1) for m in _STATE.finditer(listing) if not exists(m.group(2))]


def _refuse(match: str) -> list[str]:
    """Stop what a socket starts toward ``match``: reset a TCP connect, drop the rest."""
    return [f"{match} tcp flags syn / syn,ack reject with tcp reset".strip(),
            f"{match} meta l4proto != tcp drop".strip()]


def _quote(text: str) -> str:
    cut = re.sub(r'["\\\n]', "_", text).encode()[:COMMENT_MAX]
    return '"' + cut.decode(errors="ignore") + '"'


def rules(policy: Policy) -> list[str]:
    """The rules of the throwaway chain, in order (empty for ``open``)."""
    if policy.mode == "open":
        return []
    if policy.mode == "none":
        return _refuse("")
    out = ['oif "lo" meta l4proto { tcp, udp } th dport 53 accept']
    out += _refuse('oif "lo"')
    v4 = [str(n) for n in policy.deny if n.version == 4]
    v6 = [str(n) for n in policy.deny if n.version == 6]
    if v4:
        out += _refuse(f"ip daddr {{ {', '.join(v4)} }}")
    if v6:
        out += _refuse(f"ip6 daddr {{ {', '.join(v6)} }}")
    return out


def ruleset(policy: Policy) -> str:
    """An ``nft -f`` script that (re)creates the table atomically; for ``open`` it only
    removes one left by an earlier start."""
    lines = removal(policy.table).splitlines()
    if policy.mode == "open":
        return "\n".join(lines) + "\n"
    lo, hi = policy.uids
    lines += [
        f"table inet {policy.table} {{",
        f"\tcomment {_quote(_comment(policy.mode, policy.owner))}",
        "\tchain throwaway {",
        *(f"\t\t{r}" for r in rules(policy)),
        "\t}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        # Only sockets of throwaway users go further: packets without a socket (kernel
        # replies) and everyone else's never meet the throwaway rules.
        f"\t\tmeta skuid {lo}-{hi} jump throwaway",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def removal(table: str) -> str:
    """Delete the table if it exists (declaring it first makes the delete never fail)."""
    return f"table inet {table}\ndelete table inet {table}\n"


# --------------------------------------------------------------------------- applying


@dataclass(frozen=True)
class Status:
    """What is in force: the mode, or :data:`UNENFORCED` with the reason."""

    network: str
    reason: str = ""

    @property
    def enforced(self) -> bool:
        return self.network != UNENFORCED


def unavailable() -> str | None:
    """Why this agent cannot install rules, or None if it can try."""
    if os.geteuid() != 0:
        return "the agent is not root"
    if shutil.which("nft") is None:
        return "nft is not installed (apt-get install nftables)"
    return None


NFT_TIMEOUT = 10.0  # an nft that hangs (a wedged netlink) must not hold a start or a stop


async def _nft(script: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nft", "-f", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(script.encode()), NFT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PolicyError(f"nft did not finish in {NFT_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip().splitlines()
        raise PolicyError(f"nft failed: {text[0] if text else f'exit {proc.returncode}'}")


async def apply(policy: Policy) -> Status:
    """Install the policy (replacing any earlier copy). Never raises: a policy that cannot
    be enforced is logged loudly and reported."""
    if policy.mode == "open":
        if unavailable() is None:
            try:
                await _nft(ruleset(policy))
            except PolicyError as e:
                log.warning("network policy: could not remove old rules: %s", e)
        log.warning("network policy: ephemeral_network = \"open\": throwaway users can reach "
                    "this node's NATS, controller and sessions' ports")
        return Status("open")
    reason = unavailable()
    if reason is None:
        try:
            await _nft(ruleset(policy))
        except PolicyError as e:
            reason = str(e)
        else:
            await _remove_orphans()
    if reason is not None:
        log.warning("network policy NOT enforced (%s): throwaway users can reach this node's "
                    "NATS, controller and sessions' ports", reason)
        return Status(UNENFORCED, reason)
    log.info("network policy: throwaway users (UIDs %d-%d) network=%s, table inet %s",
             *policy.uids, policy.mode, policy.table)
    return Status(policy.mode)


async def _remove_orphans() -> None:
    proc = await asyncio.create_subprocess_exec(
        "nft", "list", "ruleset", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out, _ = await proc.communicate()
    for table in orphans(out.decode(errors="replace")):
        log.info("network policy: removing table inet %s (its agent's state is gone)", table)
        await remove(table)


async def remove(table: str) -> None:
    """Delete the agent's table (at a clean stop). Quiet when there is nothing to do."""
    if unavailable() is not None:
        return
    try:
        await _nft(removal(table))
    except PolicyError as e:
        log.warning("network policy: could not remove table inet %s: %s", table, e)
