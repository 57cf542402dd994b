"""Hatchling build hook: vendor the browser terminal (xterm.js) into the package.

The JavaScript dependencies are declared in ``web/package.json`` and pinned by
``web/package-lock.json``. When a wheel is built (``pip install .``, ``pip wheel .``, building
from the sdist) or an editable install is made (``pip install -e .``), this hook

1. runs ``npm ci`` in ``web/`` (``npm install`` when there is no lock file yet) if
   ``web/node_modules`` is missing or older than the lock file, then
2. copies ``xterm.js``, ``xterm.css`` and ``addon-fit.js`` into ``src/shoal/web/static/vendor/``.

That directory is gitignored; pyproject.toml lists it under ``artifacts`` so the wheel ships it.
No network is used at run time: the controller serves these copies itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

WEB_DIR = "web"
VENDOR_DIR = "src/shoal/web/static/vendor"
# source (relative to web/node_modules) -> name under VENDOR_DIR
VENDOR_FILES = {
    "@xterm/xterm/lib/xterm.js": "xterm.js",
    "@xterm/xterm/css/xterm.css": "xterm.css",
    "@xterm/addon-fit/lib/addon-fit.js": "addon-fit.js",
}
NPM_MISSING = (
    "building shoal needs npm to fetch the browser terminal (xterm.js), but no 'npm' command "
    "was found on PATH. Install Node.js and npm (Debian/Ubuntu: sudo apt-get install nodejs npm;"
    " macOS: brew install node; others: https://nodejs.org/) and run the install again."
)


class WebVendorHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        web = root / WEB_DIR
        if not (web / "package.json").is_file():
            raise RuntimeError(f"{web / 'package.json'} is missing: the source tree is incomplete")
        if _needs_npm(web):
            _npm(web)
        vendor = root / VENDOR_DIR
        vendor.mkdir(parents=True, exist_ok=True)
        for src, name in VENDOR_FILES.items():
            path = web / "node_modules" / src
            if not path.is_file():
                raise RuntimeError(
                    f"{path} is missing after npm ran; delete {web / 'node_modules'} and retry")
            shutil.copyfile(path, vendor / name)
        self.app.display_info(f"shoal: vendored {', '.join(VENDOR_FILES.values())} into {vendor}")


def _needs_npm(web: Path) -> bool:
    modules = web / "node_modules"
    if not all((modules / src).is_file() for src in VENDOR_FILES):
        return True
    lock = web / "package-lock.json"
    if not lock.is_file():
        return False
    # npm rewrites node_modules/.package-lock.json on every install: its age is the install's.
    stamp = modules / ".package-lock.json"
    installed = stamp if stamp.is_file() else modules
    return installed.stat().st_mtime < lock.stat().st_mtime


def _npm(web: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(NPM_MISSING)
    action = "ci" if (web / "package-lock.json").is_file() else "install"
    cmd = [npm, action, "--no-audit", "--no-fund", "--ignore-scripts"]
    try:
        subprocess.run(cmd, cwd=web, check=True)
    except FileNotFoundError as e:  # e.g. a stale PATH entry
        raise RuntimeError(NPM_MISSING) from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"'npm {action}' failed in {web} (exit {e.returncode}); it needs the npm registry "
            "(or a filled npm cache) to fetch xterm.js; see npm's output above") from e
