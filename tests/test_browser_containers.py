"""A container-backed public terminal in a real browser: with ``terminal_image`` set,
``/terminal`` hands out a container of that image (built here, offline) instead of a throwaway
Unix user, through the same pool."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from fleet import Fleet, wait_for
from shoal.agent.containers import Podman
from test_browser import browser, new_page, record, type_line, wait_text  # noqa: F401
from test_containers import IMAGE, needs_podman, podman  # noqa: F401 - the fixtures

pytestmark = needs_podman
NODE = "tnode"


@pytest.fixture(scope="module")
def cpool(tmp_path_factory: pytest.TempPathFactory, podman: Podman) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(tmp_path_factory.mktemp("cpool") / "home", agents=0,
              extra_args=("--public-terminals",))
    f.env.update(SHOAL_TERMINAL_IMAGE=IMAGE, SHOAL_TERMINAL_COMMAND="/bin/sh",
                 SHOAL_TERMINAL_DETACH_TIMEOUT="3")
    f.start()
    try:
        assert podman.root is not None and podman.runroot is not None
        f.agent(NODE, env={"SHOAL_PODMAN_ROOT": podman.root,
                           "SHOAL_PODMAN_RUNROOT": podman.runroot})
        yield f
    finally:
        f.stop()


def test_a_public_terminal_is_a_container(cpool: Fleet, browser: Browser,  # noqa: F811
                                          podman: Podman) -> None:  # noqa: F811
    page = new_page(browser, viewport={"width": 1000, "height": 600})
    page.goto(cpool.url + "/terminal")
    page.wait_for_url("**/t/*", timeout=20000)
    page.wait_for_function("window.shoalTerm && window.shoalTerm.state() === 'connected'",
                           timeout=20000)
    sid = page.url.rsplit("/", 1)[1].split("?")[0]
    wait_text(page, "#")  # busybox sh's prompt
    spec = record(cpool, sid)["spec"]
    assert isinstance(spec, dict)
    assert (spec["runtime"], spec["image"], spec["network"]) == ("container", IMAGE, "none")
    type_line(page, "echo $((6*7))")
    wait_text(page, "\n42")
    # Inside the image (its web root).
    type_line(page, "ls /www")
    wait_text(page, "index.html")
    type_line(page, "stty size")
    rows, cols = page.evaluate("[window.shoalTerm.term.rows, window.shoalTerm.term.cols]")
    wait_text(page, f"{rows} {cols}")

    def names() -> list[str]:
        return subprocess.run([*podman.base(), "ps", "--all", "--format", "{{.Names}}"],
                              capture_output=True, text=True, timeout=60).stdout.split()

    assert f"shoal-{NODE}-{sid}" in names()
    # Close the tab: after the detach timeout the session ends and its container goes.
    page.close()
    wait_for(lambda: record(cpool, sid)["state"] == "killed", timeout=30)
    assert wait_for(lambda: f"shoal-{NODE}-{sid}" not in names(), 20)
