"""Regenerate docs/images/dashboard.png and terminal.png from a real local fleet.

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fleet import Fleet  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    out = ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp) / "home", agents=3, extra_args=("--public-terminals",)).start()
        try:
            for name, cmd in (("web", ["python3", "-m", "http.server", "0"]),
                              ("worker", ["sh", "-c", "while true; do date; sleep 1; done"]),
                              ("batch", ["sh", "-c", "echo done"])):
                fleet.shoal("session", "create", "--name", name, "--", *cmd)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=shutil.which("chromium") or "",
                                            args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(f"{fleet.url}/?token={fleet.token}")
                time.sleep(12)  # let the load chart gather a few points
                page.screenshot(path=str(out / "dashboard.png"))
                term = browser.new_page(viewport={"width": 900, "height": 520})
                term.goto(f"{fleet.url}/terminal")
                term.wait_for_url("**/t/*")
                time.sleep(2)
                term.keyboard.type("whoami; echo $((6*7)); uname -sr; ls -la ~ | head -5\n")
                time.sleep(1.5)
                term.screenshot(path=str(out / "terminal.png"))
                browser.close()
        finally:
            fleet.stop()
    print(f"wrote {out}/dashboard.png and terminal.png")


if __name__ == "__main__":
    main()
