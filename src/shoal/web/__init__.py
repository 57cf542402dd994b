"""The browser side of shoal: the dashboard and the terminal page, served at ``/static/``.

``static/vendor/`` holds xterm.js, copied from npm by the build hook (hatch_build.py) when shoal
is installed; it is not in git, so a bare checkout has to be installed before it can serve
terminals.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR: Path = Path(__file__).resolve().parent / "static"
VENDOR_FILES: tuple[str, ...] = ("xterm.js", "xterm.css", "addon-fit.js")


def static_dir() -> Path:
    """The directory to serve at ``/static/``; raises RuntimeError if xterm.js is missing."""
    vendor = STATIC_DIR / "vendor"
    missing = [name for name in VENDOR_FILES if not (vendor / name).is_file()]
    if missing:
        raise RuntimeError(
            f"the web terminal files ({', '.join(missing)}) are missing from {vendor}: they are "
            "fetched with npm when shoal is built, so reinstall shoal: pip install . "
            "(or pip install -e . in a checkout; Node.js/npm must be installed)")
    return STATIC_DIR
