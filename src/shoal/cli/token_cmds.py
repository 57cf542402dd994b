"""``shoal token list|create|revoke``, ``shoal whoami`` and ``shoal audit``."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import click

from ..errors import ShoalError
from .main import arun, client_from, fail, main


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "never"


@main.group()
def token() -> None:
    """API tokens of named users, with scopes and an expiry (docs/security.md)."""


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """The tokens (never the tokens themselves: only their ids)."""
    async def go() -> list[dict[str, Any]]:
        async with client_from(ctx) as client:
            return await client.tokens()

    rows = arun(go())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'ID':<14} {'USER':<16} {'EXPIRES':<20} SCOPES")
    for r in rows:
        expires = "expired" if r["expired"] else _when(r["expires"])
        click.echo(f"{r['id']:<14} {r['user']:<16} {expires:<20} {' '.join(r['scopes'])}")


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
@click.option("-l", "--label", "--labels", "labels", multiple=True,
              help="With --join: a key=value label fixed for the nodes it enrolls.")
@click.option("--uses", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="With --join: how many node names it may enroll.")
@click.option("--name", "node_name", default="", help="With --join: the one name it enrolls.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_create(ctx: click.Context, user: str | None, scope_list: tuple[str, ...],
                 expires: str | None, join: bool, labels: tuple[str, ...], uses: int,
                 node_name: str, as_json: bool) -> None:
    """Create a token and print it, once: only its hash is kept."""
    from ..controller.apitokens import parse_lifetime
    from ..controller.scopes import parse_grants

    if join:
        from .enroll_cmds import create_join

        try:
            lifetime = parse_lifetime(expires or "1h")
        except ShoalError as e:
            fail(e.message, 2)
        create_join(ctx, lifetime, uses, labels, node_name, as_json)
        return
    if not user or not scope_list:
        fail("give --user and --scope (or --join for a join token)", 2)
    try:
        lifetime = parse_lifetime(expires or "30d")
        parse_grants(scope_list)  # say what is wrong before asking the controller
    except ShoalError as e:
        fail(e.message, 2)

    async def go() -> dict[str, Any]:
        async with client_from(ctx) as client:
            return await client.create_token(user, list(scope_list), lifetime)

    made = arun(go())
    if as_json:
        click.echo(json.dumps(made, indent=2))
        return
    click.echo(made["token"])
    click.echo(f"token {made['id']} for {made['user']} ({' '.join(made['scopes'])}), expires "
               f"{_when(made['expires'])}; it is shown only now", err=True)


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke a token: every controller refuses it within a second."""
    async def go() -> dict[str, Any]:
        async with client_from(ctx) as client:
            return await client.revoke_token(token_id)

    gone = arun(go())
    click.echo(f"revoked {gone['id']} ({gone['user']})")


@main.command()
@click.pass_context
def whoami(ctx: click.Context) -> None:
    """The user and scopes of the token in use."""
    async def go() -> dict[str, Any]:
        async with client_from(ctx) as client:
            return await client.whoami()

    me = arun(go())
    click.echo(f"{me['user']} (token {me['token']}): {' '.join(me['scopes'])}")


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
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit(ctx: click.Context, user: str | None, since: str | None, limit: int, verify: bool,
          as_json: bool) -> None:
    """Who did what: the audit trail (needs the admin scope)."""
    since_t = parse_since(since) if since else None

    async def go() -> Any:
        async with client_from(ctx) as client:
            if verify:
                return await client.verify_audit()
            return await client.audit(user, since_t, limit)

    found = arun(go())
    if verify:
        if as_json:
            click.echo(json.dumps(found, indent=2))
        for p in found["problems"]:
            click.echo(f"audit: {p['what']}", err=True)
        if found["problems"]:
            fail(f"the audit trail is broken ({len(found['problems'])} problem(s) in "
                 f"{found['entries']} entries)")
        if not as_json:
            click.echo(f"audit trail intact: {found['entries']} entries chained")
        return
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for e in found:
        what = " ".join(e["argv"]) if e.get("argv") else ""
        click.echo(f"{_when(e['time'])}  {e['user']:<12} {e['source']:<15} {e['op']:<16} "
                   f"{','.join(e['targets']) or '-':<20} {e['result']}  {what}")
