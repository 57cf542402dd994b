"""The web pages in a real browser (Debian's chromium driven by Playwright) against a real
fleet: the terminal pool, the terminal page, the waiting line, and the dashboard."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from fleet import Fleet, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two nodes with one terminal slot each; public terminals; a short detach timeout."""
    home = tmp_path_factory.mktemp("pool") / "home"
    f = Fleet(home, agents=2, extra_args=("--capacity", "1", "--public-terminals"))
    f.env["SHOAL_TERMINAL_DETACH_TIMEOUT"] = "3"
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), "chromium is missing: scripts/test-deps.sh installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
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


def record(fleet: Fleet, sid: str) -> dict[str, object]:
    r = fleet.shoal("session", "show", sid)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


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
    assert os.path.exists(f"/home/{name}/made-by-test")
    # Close the tab: after the detach timeout the session ends, its user and files go.
    page.close()
    wait_for(lambda: record(pool, sid)["state"] == "killed", timeout=30)
    assert "no client attached" in str(record(pool, sid)["reason"])
    wait_for(lambda: not os.path.exists(f"/home/{name}"), timeout=15)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)


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


def test_pages_need_a_login_when_terminals_are_private(fleet: Fleet, browser: Browser) -> None:
    page = new_page(browser)
    resp = page.goto(fleet.url + "/")
    assert resp is not None and resp.status == 401
    resp = page.goto(fleet.url + "/terminal")
    assert resp is not None and resp.status == 401
    page.close()
