"""Users, scoped tokens and the audit trail on a real fleet: a read-only token changes
nothing, a restricted token reaches no node outside its restriction by any path, a revoked
token is refused by a second controller within a second, the bucket holds no usable token,
the audit trail records a scripted scenario in order and detects a deleted entry."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fleet import Fleet, wait_for
from shoal.config import ControllerConfig, load
from shoal.controller import scopes
from shoal.controller.nats_api import NatsApi
from shoal.controller.server import Controller
from shoal.errors import AuthError


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("scopes") / "home").start()
    try:
        f.agent("dev-1", "-l", "env=dev")
        yield f
    finally:
        f.stop()


def call(url: str, method: str, path: str, token: str | None, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def make_token(fleet: Fleet, user: str, *scope_args: str, expires: str = "1h") -> tuple[str, str]:
    args = [a for s in scope_args for a in ("--scope", s)]
    r = fleet.shoal("token", "create", "--user", user, *args, "--expires", expires)
    assert r.returncode == 0, r.stderr
    tid = re.search(r"token ([0-9a-f]{12}) for", r.stderr)
    assert tid, r.stderr
    return r.stdout.strip(), tid.group(1)


def as_user(token: str) -> dict[str, str]:
    return {"SHOAL_TOKEN": token}


def nats_cfg(fleet: Fleet) -> Any:
    return load(ControllerConfig, fleet.home / "controller.toml").nats


async def nats_request(fleet: Fleet, subject: str, body: Any,
                       headers: dict[str, str] | None = None) -> Any:
    import nats

    cfg = nats_cfg(fleet)
    nc = await nats.connect(cfg.url, user=cfg.user, password=cfg.password,
                            user_credentials=cfg.creds)
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=10,
                               headers=headers)
        return json.loads(msg.data)
    finally:
        await nc.close()


def session(fleet: Fleet, token: str, **spec: Any) -> tuple[int, Any]:
    return call(fleet.url, "POST", "/api/v1/sessions", token, {"command": ["sleep", "300"],
                                                                **spec})


# ---------------------------------------------------------------------- the table


def test_every_route_and_nats_op_has_a_scope() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        ctl = Controller(ControllerConfig(token="t"))
        app = ctl.app()
    missing = []
    for route in app.router.routes():
        template = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD":
            continue
        op = scopes.http_op(route.method, template)
        if op is None or op not in scopes.OPS:
            missing.append((route.method, template))
    assert not missing, f"routes with no entry in scopes.HTTP: {missing}"
    served = set(NatsApi(ctl).ops)
    assert served == set(scopes.NATS_OPS), served ^ set(scopes.NATS_OPS)
    assert served <= set(scopes.OPS)
    for op in scopes.OPS.values():
        assert op.scope in scopes.SCOPES or op.scope in (scopes.PUBLIC, scopes.ANY)


def test_security_doc_has_the_generated_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    assert scopes.table_markdown() in doc, "docs/security.md: paste scopes.table_markdown()"


def test_grants_parse_and_refuse_nonsense() -> None:
    g = scopes.parse_grant("run:env=dev")
    assert g.reaches({"env": "dev"}, "x") and not g.reaches({"env": "prod"}, "x")
    n = scopes.parse_grant("run:web-[1-4]")
    assert n.reaches({}, "web-3") and not n.reaches({}, "web-5")
    for bad in ("root", "read:env=dev", "run:", "run:a=", "admin:own", "run:own"):
        with pytest.raises(scopes.ValidationError):
            scopes.parse_grant(bad)


def test_beyond_loopback_is_told() -> None:
    from shoal.controller.server import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("") and not _loopback("10.0.0.5")


# ---------------------------------------------------------------------- read only


def test_read_only_token_lists_but_every_change_is_403(fleet: Fleet) -> None:
    token, _ = make_token(fleet, "bob", "read")
    r = fleet.shoal("nodes", env=as_user(token))
    assert r.returncode == 0 and "node-1" in r.stdout, r.stderr
    assert call(fleet.url, "GET", "/api/v1/sessions", token)[0] == 200
    status, sess = session(fleet, fleet.token, node="node-1")
    assert status == 201, sess
    sid = sess["id"]
    svc = call(fleet.url, "POST", "/api/v1/services", fleet.token,
               {"name": "ro-web", "command": ["sleep", "300"], "replicas": 1})
    assert svc[0] in (200, 201), svc
    fill = {"id": sid, "name": "node-1"}
    bodies: dict[str, Any] = {
        "sessions.create": {"command": ["true"]}, "sessions.signal": {"signal": "TERM"},
        "nodes.drain": {}, "services.create": {"name": "x", "command": ["true"]},
        "services.scale": {"replicas": 3}, "services.drain": {},
        "tokens.create": {"user": "eve", "scopes": ["admin"]}}
    checked = 0
    for (method, path), op in scopes.HTTP.items():
        rule = scopes.OPS[op]
        if rule.reads or rule.scope in (scopes.PUBLIC, scopes.ANY) or method == "*" \
                or not path.startswith("/api/"):
            continue
        concrete = path.replace("{id}", sid).replace(
            "{name}", "ro-web" if "/services/" in path else fill["name"])
        status, answer = call(fleet.url, method, concrete, token, bodies.get(op))
        assert status == 403, (op, status, answer)
        assert f"needs the {rule.scope!r} scope" in answer["error"], answer
        checked += 1
    assert checked >= 14
    r = fleet.shoal("run", "-n", "node-1", "--", "true", env=as_user(token))
    assert r.returncode != 0 and "'run' scope" in r.stderr, r.stderr
    # Nothing changed: the session runs, the node takes work, the service has 1 replica.
    assert call(fleet.url, "GET", f"/api/v1/sessions/{sid}", token)[1]["state"] == "running"
    assert call(fleet.url, "GET", "/api/v1/nodes/node-1", token)[1]["state"] == "ready"
    assert call(fleet.url, "GET", "/api/v1/services/ro-web", token)[1]["spec"]["replicas"] == 1
    # The NATS API checks the same table.
    reply = asyncio.run(nats_request(fleet, "shoal.api.sessions.kill", {"id": sid},
                                     {"Authorization": f"Bearer {token}"}))
    assert reply["status"] == 403 and "'sessions' scope" in reply["error"], reply
    call(fleet.url, "DELETE", f"/api/v1/sessions/{sid}", fleet.token)
    call(fleet.url, "DELETE", "/api/v1/services/ro-web?deadline=0", fleet.token)


def test_a_token_cannot_grant_more_than_it_holds(fleet: Fleet) -> None:
    token, _ = make_token(fleet, "carol", "tokens", "read")
    r = fleet.shoal("token", "create", "--user", "mallory", "--scope", "admin",
                    env=as_user(token))
    assert r.returncode != 0 and "cannot grant admin" in r.stderr, r.stderr
    r = fleet.shoal("token", "create", "--user", "dave", "--scope", "read", env=as_user(token))
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------- restricted


def test_a_dev_token_reaches_no_other_node_by_any_path(fleet: Fleet) -> None:
    token, _ = make_token(fleet, "dana", "read", "run:env=dev", "sessions:env=dev",
                          "terminals:env=dev", "logs:env=dev")
    me = as_user(token)
    r = fleet.shoal("run", "-l", "env=dev", "--", "echo", "hi", env=me)
    assert r.returncode == 0 and r.stdout == "dev-1: hi\n", r.stderr
    for targets in (["--all"], ["-n", "node-1"], ["-n", "dev-1,node-2"]):
        r = fleet.shoal("run", *targets, "--", "true", env=me)
        assert r.returncode != 0, (targets, r.stdout)
        assert "outside what the token" in r.stderr and "node-" in r.stderr, r.stderr
        assert "dev-1" not in r.stderr.split("would reach")[1].split(",")[0] or \
            targets == ["--all"], r.stderr
    # Placement: a named node outside, or no node and no selector that implies env=dev.
    for spec in ({"node": "node-1"}, {}, {"selector": {"env": "prod"}}):
        status, answer = session(fleet, token, **spec)
        assert status == 403 and "outside what the token" in answer["error"], (spec, answer)
    status, mine = session(fleet, token, selector={"env": "dev"})
    assert status == 201 and mine["node"] == "dev-1", mine
    # Over NATS, the same.
    reply = asyncio.run(nats_request(fleet, "shoal.api.sessions.create",
                                     {"command": ["true"], "node": "node-1"},
                                     {"Authorization": f"Bearer {token}"}))
    assert reply["status"] == 403, reply
    # A session on node-1 (the admin's): no kill, no signal, no logs, no attach.
    status, other = session(fleet, fleet.token, node="node-1")
    assert status == 201, other
    oid = other["id"]
    for method, path, body in (("POST", f"/api/v1/sessions/{oid}/kill", None),
                               ("POST", f"/api/v1/sessions/{oid}/signal", {"signal": "TERM"}),
                               ("DELETE", f"/api/v1/sessions/{oid}", None),
                               ("GET", f"/api/v1/sessions/{oid}/logs", None),
                               ("GET", f"/api/v1/sessions/{oid}/attach", None)):
        status, answer = call(fleet.url, method, path, token, body)
        assert status == 403 and "outside what the token" in answer["error"], (path, answer)

    async def attach() -> None:  # a real WebSocket, as `shoal session attach` opens it
        from shoal.client.aio import Client

        async with Client(fleet.url, token) as client, client.attach(oid) as a:
            async for _ in a:
                break

    with pytest.raises(AuthError, match="403"):
        asyncio.run(attach())
    # Its own dev session: logs and kill are fine.
    assert call(fleet.url, "GET", f"/api/v1/sessions/{mine['id']}/logs", token)[0] == 200
    assert call(fleet.url, "POST", f"/api/v1/sessions/{mine['id']}/kill", token)[0] == 200
    assert call(fleet.url, "GET", f"/api/v1/sessions/{oid}", fleet.token)[1]["state"] == \
        "running"
    call(fleet.url, "DELETE", f"/api/v1/sessions/{oid}", fleet.token)


def test_own_sessions_only(fleet: Fleet) -> None:
    erin, _ = make_token(fleet, "erin", "read", "sessions:own")
    frank, _ = make_token(fleet, "frank", "read", "sessions:own")
    status, rec = session(fleet, erin)
    assert status == 201 and rec["owner"] == "erin", rec
    status, answer = call(fleet.url, "POST", f"/api/v1/sessions/{rec['id']}/kill", frank)
    assert status == 403, answer
    assert call(fleet.url, "POST", f"/api/v1/sessions/{rec['id']}/kill", erin)[0] == 200


# ---------------------------------------------------------------------- revocation


def test_revoked_token_is_refused_by_a_second_controller_within_a_second(
        fleet: Fleet) -> None:
    token, tid = make_token(fleet, "gina", "read")
    _, second = fleet.controller()
    assert call(second, "GET", "/api/v1/nodes", token)[0] == 200
    r = fleet.shoal("token", "revoke", tid)
    assert r.returncode == 0, r.stderr
    revoked = time.monotonic()
    while call(second, "GET", "/api/v1/nodes", token)[0] != 401:
        assert time.monotonic() - revoked < 1.0, "the second controller still takes it"
        time.sleep(0.02)
    assert call(fleet.url, "GET", "/api/v1/nodes", token)[0] == 401
    listed = fleet.shoal("token", "list", "--json")
    assert tid not in listed.stdout
    # Two controllers appending at once keep one chain.
    other, _ = make_token(fleet, "hal", "sessions", "read")

    def churn(url: str, n: int) -> None:
        for _ in range(n):
            call(url, "POST", "/api/v1/sessions", other, {"command": ["true"]})

    import threading

    threads = [threading.Thread(target=churn, args=(u, 8)) for u in (fleet.url, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r = fleet.shoal("audit", "--verify")
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr


def test_browser_login_with_a_users_token(fleet: Fleet) -> None:
    token, tid = make_token(fleet, "ivy", "read")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"{fleet.url}/?token={token}", timeout=10)
        raise AssertionError("no redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 302
        cookie = e.headers["Set-Cookie"].split(";")[0]
        csrf = e.headers["Location"].split("#csrf=")[1]
    login = {"Cookie": cookie, "X-Shoal-CSRF": csrf}
    status, me = call(fleet.url, "GET", "/api/v1/whoami", None, headers=login)
    assert status == 200 and me["user"] == "ivy" and me["scopes"] == ["read"], me
    assert fleet.shoal("token", "revoke", tid).returncode == 0
    wait_for(lambda: call(fleet.url, "GET", "/api/v1/whoami", None, headers=login)[0] == 401,
             timeout=5)


def test_the_bucket_holds_no_recoverable_token(fleet: Fleet) -> None:
    token, tid = make_token(fleet, "judy", "admin")

    async def values() -> list[bytes]:
        import nats

        cfg = nats_cfg(fleet)
        nc = await nats.connect(cfg.url, user=cfg.user, password=cfg.password,
                                user_credentials=cfg.creds)
        try:
            kv = await nc.jetstream().key_value("shoal-tokens")
            return [(await kv.get(k)).value or b"" for k in await kv.keys()]
        finally:
            await nc.close()

    stored = asyncio.run(values())
    assert stored and any(tid.encode() in v for v in stored)
    secret = token.split("_", 2)[2]
    for v in stored:
        assert token.encode() not in v and secret.encode() not in v
        assert secret[:16].encode() not in v
    # What is there (the hash) does not open the API.
    record = json.loads(next(v for v in stored if tid.encode() in v))
    for guess in (record["hash"], f"shoal_{tid}_{record['hash']}"):
        assert call(fleet.url, "GET", "/api/v1/nodes", guess)[0] == 401


# ---------------------------------------------------------------------- audit


def test_audit_records_a_scenario_in_order(fleet: Fleet) -> None:
    since = time.time()
    alice, alice_id = make_token(fleet, "alice", "read", "sessions")
    bob, _ = make_token(fleet, "bob", "read")
    status, rec = session(fleet, alice, node="node-2")
    assert status == 201
    assert call(fleet.url, "POST", f"/api/v1/sessions/{rec['id']}/kill", bob)[0] == 403
    assert call(fleet.url, "POST", f"/api/v1/sessions/{rec['id']}/kill", alice)[0] == 200
    assert fleet.shoal("run", "-n", "node-1", "--", "echo", "audited").returncode == 0
    assert fleet.shoal("token", "revoke", alice_id).returncode == 0
    r = fleet.shoal("audit", "--since", repr(since), "--json")
    assert r.returncode == 0, r.stderr
    got = [(e["user"], e["op"], e["status"]) for e in json.loads(r.stdout)]
    assert got == [("admin", "tokens.create", 201), ("admin", "tokens.create", 201),
                   ("alice", "sessions.create", 201), ("bob", "sessions.kill", 403),
                   ("alice", "sessions.kill", 200), ("admin", "run", 200),
                   ("admin", "tokens.revoke", 200)], got
    entries = json.loads(r.stdout)
    assert entries[2]["targets"][0] == rec["id"] and entries[2]["argv"] == ["sleep", "300"]
    assert entries[5]["argv"] == ["echo", "audited"] and entries[5]["targets"] == ["node-1"]
    assert all(e["source"] == "127.0.0.1" for e in entries)
    assert entries[0]["token"] == "admin" and entries[2]["token"] == alice_id
    only = fleet.shoal("audit", "--since", repr(since), "--user", "bob", "--json")
    assert [e["op"] for e in json.loads(only.stdout)] == ["sessions.kill"]
    assert fleet.shoal("audit", env=as_user(bob)).returncode != 0  # needs admin


def test_verify_detects_a_deleted_entry(fleet: Fleet) -> None:
    """Last in this module: it breaks the fleet's chain on purpose."""
    assert fleet.shoal("token", "create", "--user", "kim", "--scope", "read").returncode == 0
    r = fleet.shoal("audit", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr

    async def delete_one() -> int:
        import nats

        cfg = nats_cfg(fleet)
        nc = await nats.connect(cfg.url, user=cfg.user, password=cfg.password,
                                user_credentials=cfg.creds)
        try:
            info = await nc.jetstream().stream_info("shoal-audit")
            victim = info.state.last_seq - 1
            reply = await nc.request("$JS.API.STREAM.MSG.DELETE.shoal-audit",
                                     json.dumps({"seq": victim}).encode(), timeout=5)
            assert json.loads(reply.data).get("success"), reply.data
            return victim
        finally:
            await nc.close()

    victim = asyncio.run(delete_one())
    r = fleet.shoal("audit", "--verify")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"entry {victim} was deleted" in r.stderr, r.stderr
