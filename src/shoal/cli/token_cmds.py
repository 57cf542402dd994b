"""``shoal token list|create|revoke``, ``shoal whoami`` and ``shoal audit``."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from ..errors import ShoalError
from .main import checking, fail, main, with_client
from .options import json_option, labels_option, print_json, prints_record

if TYPE_CHECKING:
    from ..client.sync import SyncClient


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "never"


def _print_tokens(rows: list[dict[str, Any]]) -> None:
    click.echo(f"{'ID':<14} {'USER':<16} {'EXPIRES':<20} SCOPES")
    for r in rows:
        expires = "expired" if r["expired"] else _when(r["expires"])
        click.echo(f"{r['id']:<14} {r['user']:<16} {expires:<20} {' '.join(r['scopes'])}")


def _print_made(made: dict[str, Any]) -> None:
    if "uses" in made:  # a join token
        from .enroll_cmds import print_join

        print_join(made)
        return
    click.echo(made["token"])
    click.echo(f"token {made['id']} for {made['user']} ({' '.join(made['scopes'])}), expires "
               f"{_when(made['expires'])}; it is shown only now", err=True)


@main.group()
def token() -> None:
    """API tokens of named users, with scopes and an expiry (docs/security.md)."""


@token.command("list")
@prints_record(_print_tokens, "The tokens' records as a JSON list.")
@with_client
def token_list(client: SyncClient) -> list[dict[str, Any]]:
    """The tokens (never the tokens themselves: only their ids)."""
    return client.tokens()


@token.command("create")
@click.option("--user", help="Who the token is for (a person or a robot).")
@click.option("--scope", "scope_list", multiple=True,
              help="A grant: read, logs, run, sessions, terminals, services, nodes, tokens, "
                   "admin; restricted as run:env=dev, run:web-[1-4] or sessions:own "
                   "(repeatable).")
@click.option("--expires", default=None,
              help="Lifetime: 30d, 12h, 90m, 3600s, or never (default: 30d; 1h with --join).")
@click.option("--join", is_flag=True,
              help="A join token instead: it enrolls new nodes (shoal agent --join URL --token "
                   "T); use a short --expires, such as 1h.")
@labels_option("-l", "--label", "--labels",
               help="With --join: a key=value label fixed for the nodes it enrolls.")
@click.option("--uses", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="With --join: how many node names it may enroll.")
@click.option("--name", "node_name", default="", help="With --join: the one name it enrolls.")
@prints_record(_print_made, "The new token's record, the token in it, as JSON.")
@with_client
def token_create(client: SyncClient, user: str | None, scope_list: tuple[str, ...],
                 expires: str | None, join: bool, labels: dict[str, str], uses: int,
                 node_name: str) -> dict[str, Any]:
    """Create a token and print it, once: only its hash is kept."""
    from ..controller.apitokens import parse_lifetime
    from ..controller.scopes import parse_grants

    if join:
        from .enroll_cmds import create_join

        with checking("join token"):
            lifetime = parse_lifetime(expires or "1h")
        return create_join(client, lifetime, uses, labels, node_name)
    if not user or not scope_list:
        fail("give --user and --scope (or --join for a join token)", 2)
    with checking("token"):
        lifetime = parse_lifetime(expires or "30d")
        parse_grants(scope_list)  # say what is wrong before asking the controller
    return client.create_token(user, list(scope_list), lifetime)


@token.command("revoke")
@click.argument("token_id")
@prints_record(lambda gone: click.echo(f"revoked {gone['id']} ({gone['user']})"),
               "The revoked token's record as JSON.")
@with_client
def token_revoke(client: SyncClient, token_id: str) -> dict[str, Any]:
    """Revoke a token: every controller refuses it within a second."""
    return client.revoke_token(token_id)


@main.command()
@prints_record(lambda me: click.echo(f"{me['user']} (token {me['token']}): "
                                     f"{' '.join(me['scopes'])}"),
               "The user, token id and scopes as JSON.")
@with_client
def whoami(client: SyncClient) -> dict[str, Any]:
    """The user and scopes of the token in use."""
    return client.whoami()


def parse_since(text: str) -> float:
    """``1h``/``2d`` ago, a Unix time, or an ISO date/time."""
    from ..controller.apitokens import parse_lifetime

    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    try:
        ago = parse_lifetime(text)
    except ShoalError:
        ago = None
    if ago is None:
        fail(f"--since {text!r}: give a time ago (1h, 2d), a Unix time or an ISO date "
             "(2026-01-31T12:00)", 2)
    return time.time() - ago


@main.command()
@click.option("--user", default=None, help="Only this user's entries.")
@click.option("--since", default=None, help="From this time: 1h, 2d, a Unix time, an ISO date.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10000))
@click.option("--verify", is_flag=True, help="Check the hash chain; exit 1 if it is broken.")
@json_option("The entries (or with --verify the verdict) as JSON.")
@with_client
def audit(client: SyncClient, user: str | None, since: str | None, limit: int, verify: bool,
          as_json: bool) -> None:
    """Who did what: the audit trail (needs the admin scope)."""
    since_t = parse_since(since) if since else None
    if verify:
        verdict = client.verify_audit()
        if as_json:
            print_json(verdict)
        for p in verdict["problems"]:
            click.echo(f"audit: {p['what']}", err=True)
        if verdict["problems"]:
            fail(f"the audit trail is broken ({len(verdict['problems'])} problem(s) in "
                 f"{verdict['entries']} entries)")
        if not as_json:
            click.echo(f"audit trail intact: {verdict['entries']} entries chained")
        return
    entries = client.audit(user, since_t, limit)
    if as_json:
        print_json(entries)
        return
    for e in entries:
        what = " ".join(e["argv"]) if e.get("argv") else ""
        click.echo(f"{_when(e['time'])}  {e['user']:<12} {e['source']:<15} {e['op']:<16} "
                   f"{','.join(e['targets']) or '-':<20} {e['result']}  {what}")
