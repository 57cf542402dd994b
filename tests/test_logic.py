"""Pure logic, driven without sockets: selection, outcomes, messages, configuration."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from shoal.config import AgentConfig, load, parse_labels, to_toml
from shoal.errors import ConfigError, NotFoundError, ValidationError
from shoal.logic.outcome import node_status, summarize
from shoal.logic.targets import select
from shoal.wire import messages as m


def _nodes(**states: str) -> dict[str, m.NodeInfo]:
    return {name.replace("_", "-"): m.NodeInfo(name=name.replace("_", "-"), state=st,  # type: ignore[arg-type]
                                               labels={"zone": "a" if "1" in name else "b"})
            for name, st in states.items()}


NODES = _nodes(node_1="ready", node_2="ready", node_3="down", web_1="draining")


def test_select_all_takes_live_nodes_only() -> None:
    assert select(m.Targets(all=True), NODES) == ["node-1", "node-2", "web-1"]


def test_select_named_down_nodes_are_kept() -> None:
    assert select(m.Targets(nodes="node-[1-3]"), NODES) == ["node-1", "node-2", "node-3"]


def test_select_exclude_and_labels() -> None:
    assert select(m.Targets(all=True, exclude="web-1"), NODES) == ["node-1", "node-2"]
    assert select(m.Targets(labels={"zone": "a"}), NODES) == ["node-1", "web-1"]
    assert select(m.Targets(nodes="node-[1-2]", labels={"zone": "b"}), NODES) == ["node-2"]


@pytest.mark.parametrize(("targets", "error", "text"), [
    (m.Targets(), ValidationError, "no targets"),
    (m.Targets(nodes="node-9"), NotFoundError, "unknown node(s): node-9"),
    (m.Targets(all=True, exclude="node-[1-2],web-1"), NotFoundError, "matched no node"),
    (m.Targets(nodes="node-[2-1]"), ValidationError, "bad node set"),
    (m.Targets(labels={"zone": "zz"}), NotFoundError, "matched no node"),
])
def test_select_errors(targets: m.Targets, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        select(targets, NODES)


def test_outcome() -> None:
    ok = m.Exit(node="a", code=0)
    assert summarize({"a": ok}).status == 0 and summarize({"a": ok}).summary == ""
    res = {"a": ok, "b": m.Exit(node="b", code=3), "c": m.Exit(node="c", code=127),
           "d": m.Exit(node="d", signal=9), "e": m.Exit(node="e", timed_out=True, signal=15),
           "f": m.Unreachable(node="f", reason="down")}
    out = summarize(res)
    assert out.status == 255
    assert out.summary == ("shoal: 1 ok; exit 3: b; exit 127: c; exit 137: d; timed out: e; "
                           "unreachable: f")
    assert summarize({"a": ok, "b": m.Exit(node="b", code=3)}).status == 3
    assert summarize({}, missing=["x"]).status == 255
    assert node_status(m.Exit(node="x", signal=2)) == 130


def test_run_spec_validation() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"argv": []}, m.RunSpec)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"argv": ["x"], "timeout": -1}, m.RunSpec)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"argv": ["x"], "bogus": 1}, m.RunSpec)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"argv": ["x" * 70000]}, m.RunSpec)
    spec = msgspec.convert({"argv": ["printf", "%s\n", "a b"]}, m.RunSpec)
    assert m.unpack(m.pack(spec), m.RunSpec) == spec


def test_frames_round_trip() -> None:
    frames: list[m.ServerFrame] = [
        m.RunPlan(run_id="r", nodes=["a"]), m.Output(node="a", stream="stdout", offset=3,
                                                     data=b"\xff\x00"),
        m.Exit(node="a", code=1), m.Unreachable(node="a", reason="x"), m.RunDone(),
        m.ErrorFrame(status=400, message="bad")]
    for f in frames:
        assert m.unpack_server_frame(m.pack(f)) == f
    ctl: list[m.RunControl] = [m.StdinData(offset=0, data=b"x", eof=True),
                               m.Resize(cols=1, rows=2), m.SignalRun(signum=2),
                               m.Keepalive(), m.Cancel()]
    for c in ctl:
        assert m.unpack_control(m.pack(c)) == c


def test_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(to_toml({"capacity": 4, "name": "file", "labels": {"a": "1"},
                             "nats": {"url": "nats://x:1", "user": "agent"}}))
    cfg = load(AgentConfig, path)
    assert (cfg.capacity, cfg.name, cfg.labels, cfg.nats.url) == (4, "file", {"a": "1"},
                                                                   "nats://x:1")
    monkeypatch.setenv("SHOAL_CAPACITY", "8")
    monkeypatch.setenv("SHOAL_NATS_URL", "nats://env:2")
    cfg = load(AgentConfig, path)
    assert (cfg.capacity, cfg.nats.url, cfg.nats.user) == (8, "nats://env:2", "agent")
    cfg = load(AgentConfig, path, {"capacity": 9, "nats": {"url": None}})
    assert (cfg.capacity, cfg.nats.url) == (9, "nats://env:2")


def test_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("capacity = 'lots'\n")
    with pytest.raises(ConfigError, match="invalid configuration"):
        load(AgentConfig, path)
    path.write_text("capacity = \n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load(AgentConfig, path)
    path.write_text("surprise = 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        load(AgentConfig, path)
    with pytest.raises(ConfigError, match="key=value"):
        parse_labels(["novalue"])
    assert not os.environ.get("SHOAL_CAPACITY")
