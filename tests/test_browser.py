"""The web pages in a real browser (Debian's chromium driven by Playwright) against a real
fleet: the terminal pool, the terminal page, the waiting line, and the dashboard."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from conftest import start_fleet, wants_tls
from fleet import Fleet, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """Two nodes with one terminal slot each; public terminals; a short detach timeout."""
    f = start_fleet(request, "pool", agents=2,
                    extra_args=("--capacity", "1", "--public-terminals"),
                    env={"SHOAL_TERMINAL_DETACH_TIMEOUT": "3"})
    try:
        yield f
    finally:
        f.stop()


def pinned(server_cert: Path) -> list[str]:
    """Chromium's flags to trust exactly this certificate's key and nothing else (not
    ignore_https_errors, which would accept any certificate at all)."""
    from shoal import pki

    spki = pki.spki_sha256(server_cert.read_bytes())
    return [*ARGS, f"--ignore-certificate-errors-spki-list={spki}"]


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    """Chromium; for a [tls] test it trusts the key of the TLS fleets' server certificate."""
    assert os.path.exists(CHROMIUM), "chromium is missing: scripts/test-deps.sh installs it"
    args = pinned(request.getfixturevalue("test_pki") / "server.pem") if wants_tls(request) \
        else ARGS
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Browser, **kw: object) -> Page:
    # The pages forbid eval by CSP; Playwright's string predicates need it in tests only.
    return browser.new_page(bypass_csp=True, **kw)  # type: ignore[arg-type]


def screen_text(page: Page) -> str:
    """What the terminal shows, scrollback included."""
    return str(page.evaluate("""() => {
        const buf = window.shoalTerm.term.buffer.active; const out = [];
        for (let i = 0; i < buf.length; i++) out.push(buf.getLine(i).translateToString(true));
        return out.join("\\n"); }"""))


def wait_text(page: Page, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = screen_text(page)
        if needle in text:
            return text
        page.wait_for_timeout(100)
    raise AssertionError(f"{needle!r} never showed; screen:\n{screen_text(page)}")


def open_terminal(browser: Browser, url: str) -> tuple[Page, str]:
    page = new_page(browser, viewport={"width": 1000, "height": 600})
    page.goto(url + "/terminal")
    page.wait_for_url("**/t/*", timeout=20000)
    page.wait_for_function("window.shoalTerm && window.shoalTerm.state() === 'connected'",
                           timeout=20000)
    sid = page.url.rsplit("/", 1)[1].split("?")[0]
    wait_text(page, "$")  # the prompt
    return page, sid


def type_line(page: Page, text: str) -> None:
    page.locator("#term").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def record(fleet: Fleet, sid: str) -> dict[str, object]:
    r = fleet.shoal("session", "show", sid)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.tls
def test_terminal_echo_resize_reload_and_close(pool: Fleet, browser: Browser) -> None:
    page, sid = open_terminal(browser, pool.url)
    assert "token" not in page.url
    type_line(page, "echo $((6*7))")
    wait_text(page, "\n42")
    # Resize the window: the shell's terminal follows.
    type_line(page, "stty size")
    rows, cols = page.evaluate("[window.shoalTerm.term.rows, window.shoalTerm.term.cols]")
    wait_text(page, f"{rows} {cols}")
    page.set_viewport_size({"width": 700, "height": 400})
    page.wait_for_function(f"window.shoalTerm.term.cols < {cols}")
    rows2, cols2 = page.evaluate("[window.shoalTerm.term.rows, window.shoalTerm.term.cols]")
    page.wait_for_timeout(300)
    type_line(page, "stty size")
    wait_text(page, f"{rows2} {cols2}")
    # Reload: the earlier output comes back, once.
    type_line(page, "echo mark-$((20+3))")
    wait_text(page, "mark-23\n")
    page.reload()
    page.wait_for_function("window.shoalTerm && window.shoalTerm.state() === 'connected'")
    text = wait_text(page, "mark-23")
    assert text.count("mark-23") == 1 and text.count("\n42") == 1
    type_line(page, "echo still-$((1+1))")
    wait_text(page, "still-2")
    name = str(record(pool, sid)["user"])
    assert name.startswith("shoal-")
    type_line(page, "whoami; touch ~/made-by-test; pwd")
    who = wait_text(page, f"/home/{name}").split("whoami; touch ~/made-by-test; pwd")[-1]
    assert who.split()[0] == name
    # The home is a private tmpfs in the session's own mount namespace: seen through it.
    pid = record(pool, sid)["pid"]
    assert os.path.exists(f"/proc/{pid}/root/home/{name}/made-by-test")
    # Close the tab: after the detach timeout the session ends, its user and files go.
    page.close()
    wait_for(lambda: record(pool, sid)["state"] == "killed", timeout=30)
    assert "no client attached" in str(record(pool, sid)["reason"])
    # Its files go first, then the user: wait for both (the home alone left a moment's race).
    wait_for(lambda: not os.path.exists(f"/home/{name}") and not _user_exists(name),
             timeout=15)


def test_waiting_line_lets_the_visitor_in(pool: Fleet, browser: Browser) -> None:
    first, sid1 = open_terminal(browser, pool.url)
    second, sid2 = open_terminal(browser, pool.url)
    waiting = new_page(browser)
    waiting.goto(pool.url + "/terminal")
    waiting.wait_for_selector("#position:not([hidden])", timeout=20000)
    assert waiting.locator("#place").inner_text() == "1"
    assert "/terminal" in waiting.url
    # A crawler's GET does not take a slot.
    live = json.loads(pool.shoal("session", "list", "--state", "live", "--json").stdout)
    assert {s["id"] for s in live} == {sid1, sid2}
    # End one session: the waiting visitor gets in by itself.
    assert pool.shoal("session", "kill", sid1).returncode == 0
    waiting.wait_for_url("**/t/*", timeout=30000)
    waiting.wait_for_function("window.shoalTerm && window.shoalTerm.state() === 'connected'")
    # The page of the killed session says so, with the reason.
    first.wait_for_selector("#banner:not([hidden])", timeout=20000)
    assert "killed" in first.locator("#banner").inner_text()
    for p in (first, second, waiting):
        p.close()


@pytest.mark.tls
def test_dashboard_shows_nodes_and_sessions(pool: Fleet, browser: Browser,
                                            tmp_path: Path) -> None:
    r = pool.shoal("session", "create", "--name", "dash-demo", "--", "sleep", "30")
    sid = r.stdout.strip()
    page = new_page(browser, viewport={"width": 1200, "height": 800})
    page.goto(f"{pool.url}/?token={pool.token}")
    assert "token" not in page.url
    page.wait_for_function("window.shoalDashboard && window.shoalDashboard.nodes().length >= 2",
                           timeout=20000)
    body = page.locator("body").inner_text()
    assert "node-1" in body and "node-2" in body
    page.wait_for_function(
        f"window.shoalDashboard.sessions().some(s => s.id === '{sid}')", timeout=20000)
    assert "dash-demo" in page.locator("body").inner_text()
    phone = new_page(browser, viewport={"width": 390, "height": 800})
    phone.goto(f"{pool.url}/?token={pool.token}")
    phone.wait_for_function("window.shoalDashboard && window.shoalDashboard.nodes().length >= 2")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, "the page itself does not scroll sideways on a phone"
    pool.shoal("session", "rm", sid)
    page.close()
    phone.close()


def test_dashboard_summarises_the_fleet_and_searches_nodes(pool: Fleet,
                                                           browser: Browser) -> None:
    page = new_page(browser, viewport={"width": 1200, "height": 800})
    page.goto(f"{pool.url}/?token={pool.token}")
    page.wait_for_function("window.shoalDashboard && window.shoalDashboard.fleet() && "
                           "window.shoalDashboard.nodes().length >= 2", timeout=20000)
    assert "2 ready" in page.locator("#fleet-summary").inner_text()
    rows = "document.querySelectorAll('#nodes tbody tr')"
    # The search runs on the controller: a node set, then text, then a state with no match.
    page.fill("#n-text", "node-[2]")
    page.wait_for_function(f"{rows}.length === 1 && {rows}[0].innerText.includes('node-2')",
                           timeout=20000)
    page.fill("#n-text", "NODE-1")
    page.wait_for_function(f"{rows}.length === 1 && {rows}[0].innerText.includes('node-1')",
                           timeout=20000)
    page.fill("#n-text", "")
    page.select_option("#n-state", "down")
    page.wait_for_function(f"{rows}[0].innerText.includes('no node matches')", timeout=20000)
    page.close()


@pytest.mark.tls
def test_a_user_logs_in_with_their_own_token(pool: Fleet, browser: Browser) -> None:
    """The dashboard shows who is logged in, and hides the kill buttons and terminal links
    from a read-only user (the API would refuse them: test_scopes.py)."""
    made = pool.shoal("token", "create", "--user", "rita", "--scope", "read")
    assert made.returncode == 0, made.stderr
    r = pool.shoal("session", "create", "--name", "not-yours", "--", "sleep", "30")
    sid = r.stdout.strip()
    page = new_page(browser, viewport={"width": 1200, "height": 800})
    page.goto(f"{pool.url}/?token={made.stdout.strip()}")
    assert "token" not in page.url
    page.wait_for_function("document.getElementById('who').textContent.includes('rita')",
                           timeout=20000)
    assert page.locator("#who").inner_text() == "rita (read)"
    page.wait_for_function(
        f"window.shoalDashboard.sessions().some(s => s.id === '{sid}')", timeout=20000)
    assert not page.locator(f"button[data-kill='{sid}']").is_visible()
    assert not page.locator(f"a[href='/t/{sid}']").is_visible()  # no terminals scope
    # Where drawn (a running session), the CSS of the missing scopes hides them.
    assert page.evaluate("document.body.classList.contains('no-sessions') && "
                         "document.body.classList.contains('no-terminals')")
    pool.shoal("session", "rm", sid)
    page.close()


@pytest.mark.tls
def test_pages_need_a_login_when_terminals_are_private(fleet: Fleet, browser: Browser) -> None:
    page = new_page(browser)
    resp = page.goto(fleet.url + "/")
    assert resp is not None and resp.status == 401
    resp = page.goto(fleet.url + "/terminal")
    assert resp is not None and resp.status == 401
    page.close()


ATTACK = """<!doctype html><title>cat pictures</title><script>
const api = "API";
Promise.allSettled([
  fetch(api + "/api/v1/sessions", {method: "POST", mode: "no-cors", credentials: "include",
        body: JSON.stringify({name: "pwned", shell: "touch MARKER"})}),
  fetch(api + "/api/v1/sessions", {method: "POST", mode: "no-cors", credentials: "include",
        headers: {"Content-Type": "text/plain"},
        body: JSON.stringify({name: "pwned-2", shell: "touch MARKER"})}),
  fetch(api + "/terminal", {method: "POST", mode: "no-cors", credentials: "include",
        body: "{}"}),
]).then(() => { document.title = "sent"; });
</script>"""


class AttackSite:
    """A terminal user's web server on another port of the same host: serves the page and
    keeps the Cookie headers browsers send it (cookies do not tell ports apart)."""

    def __init__(self, api: str, marker: Path) -> None:
        page = ATTACK.replace("API", api).replace("MARKER", str(marker)).encode()
        self.cookies: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                site.cookies += self.headers.get_all("Cookie") or []
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AttackSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def api_status(url: str, headers: dict[str, str], method: str = "GET",
               body: bytes | None = None, ca: Path | None = None) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_a_page_on_another_port_cannot_use_the_login(fleet: Fleet, browser: Browser,
                                                     tmp_path: Path) -> None:
    """The cross-port attack: a logged-in operator visits a page that a terminal user serves
    on another loopback port. Its requests carry the login cookie (same host), yet create
    nothing; and the cookie that reached the attacker's server opens nothing either."""
    marker = tmp_path / "pwned"
    context = browser.new_context(bypass_csp=True)  # for the string predicates only
    page = context.new_page()
    page.goto(f"{fleet.url}/?token={fleet.token}")
    assert "token" not in page.url and "csrf" not in page.url
    page.wait_for_function("window.shoalDashboard && window.shoalDashboard.nodes().length >= 2",
                           timeout=20000)  # logged in: the dashboard reads the API
    with AttackSite(fleet.url, marker) as site:
        attack = context.new_page()
        attack.goto(site.url + "/cats")
        attack.wait_for_function("document.title === 'sent'", timeout=20000)
        sessions = json.loads(fleet.shoal("session", "list", "--json").stdout)
        assert not [s for s in sessions if str(s["name"]).startswith("pwned")], sessions
        assert not marker.exists()
        stolen = [c.split("=", 1) for header in site.cookies for c in header.split("; ")]
    assert stolen, "the browser sent the login cookie to the other port, as browsers do"
    spec = json.dumps({"name": "pwned-3", "shell": f"touch {marker}"}).encode()
    for name, value in stolen:
        assert value != fleet.token
        assert api_status(f"{fleet.url}/api/v1/nodes", {"Authorization": f"Bearer {value}"}) \
            == 401
        # Replayed by hand with every header a browser would send, but no CSRF token:
        replay = {"Cookie": f"{name}={value}", "Origin": fleet.url,
                  "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
        assert api_status(f"{fleet.url}/api/v1/sessions", replay, "POST", spec) == 403
        assert api_status(f"{fleet.url}/api/v1/sessions", replay) == 403
    assert not marker.exists()
    context.close()


@pytest.mark.tls
def test_the_operator_opens_a_terminal_and_logs_out(fleet: Fleet, browser: Browser) -> None:
    """The login's CSRF token reaches the terminal page's WebSocket (a cookie alone would be
    refused), and the dashboard's logout ends the login for good."""
    r = fleet.shoal("session", "create", "--name", "op-term", "--tty", "--", "cat")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    context = browser.new_context(bypass_csp=True)  # for the string predicates only
    page = context.new_page()
    page.goto(f"{fleet.url}/?token={fleet.token}")
    page.wait_for_function("window.shoalDashboard && window.shoalDashboard.sessions().length",
                           timeout=20000)
    term = context.new_page()
    term.goto(f"{fleet.url}/t/{sid}")
    term.wait_for_function("window.shoalTerm && window.shoalTerm.state() === 'connected'",
                           timeout=20000)
    type_line(term, "hello-from-the-operator")
    wait_text(term, "hello-from-the-operator\nhello-from-the-operator")
    term.close()
    cookie = next(c["value"] for c in context.cookies() if c["name"] == "shoal_login")
    csrf = page.evaluate("window.shoalLogin.csrf()")
    assert cookie and csrf
    headers = {"Cookie": f"shoal_login={cookie}", "X-Shoal-CSRF": csrf}
    assert api_status(f"{fleet.url}/api/v1/nodes", headers, ca=fleet.ca) == 200
    page.click("#logout")
    page.wait_for_selector("#error:not([hidden])", timeout=20000)
    assert "logged out" in page.locator("#error").inner_text()
    assert api_status(f"{fleet.url}/api/v1/nodes", headers, ca=fleet.ca) == 401
    assert page.evaluate("window.shoalLogin.csrf()") == ""
    assert not [c for c in context.cookies() if c["name"] == "shoal_login"]
    resp = page.reload()
    assert resp is not None and resp.status == 401
    context.close()
    fleet.shoal("session", "rm", sid)
