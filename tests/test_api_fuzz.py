"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis): no
input, however malformed, gets a server error."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Nodes with no capacity: every request is exercised, but no generated command ever
    runs on this machine."""
    f = Fleet(tmp_path_factory.mktemp("fuzz") / "home", agents=2,
              extra_args=("--capacity", "0")).start()
    try:
        yield f
    finally:
        f.stop()


def test_no_input_gets_a_server_error(fleet: Fleet, tmp_path: Path) -> None:
    doc = tmp_path / "openapi.json"
    req = urllib.request.Request(fleet.url + "/api/v1/openapi.json",
                                 headers={"Authorization": f"Bearer {fleet.token}"})
    doc.write_bytes(urllib.request.urlopen(req, timeout=10).read())
    r = subprocess.run(
        [SCHEMATHESIS, "run", str(doc), "--url", fleet.url,
         "-H", f"Authorization: Bearer {fleet.token}", "--checks", "not_a_server_error",
         "--max-examples", "25", "--seed", "1",
         # WebSockets, and operations that legitimately wait (drain --wait) or answer 503
         # (a service with no healthy replica) are left out.
         "--exclude-path-regex", "attach|/run$|drain|/best"],
        capture_output=True, text=True, timeout=600, env={**fleet.env, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout


def test_a_name_no_node_can_have_is_refused_as_such(fleet: Fleet) -> None:
    """The fuzzer's finding: revoking `)¡\\x96` asked NATS for an invalid key and answered
    503 `NATS is not reachable (nats: JetStream.InvalidKeyError)`."""
    import json
    import urllib.error

    req = urllib.request.Request(fleet.url + "/api/v1/nodes/%29%C2%A1%C2%96/revoke",
                                 method="POST",
                                 headers={"Authorization": f"Bearer {fleet.token}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and "letters, digits" in body["error"], body
