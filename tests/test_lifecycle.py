"""The session lifecycle's record-level rules (shoal.logic.sessionstate) and the sessions
reconciler (shoal.logic.sessionreconcile), driven without NATS: records in, actions out."""

from __future__ import annotations

import msgspec
import pytest

from shoal.errors import ConflictError, IllegalTransition
from shoal.logic import sessionreconcile as sr
from shoal.logic import sessionstate
from shoal.wire import messages as m

NOW = 1_000_000.0


def rec(sid: str = "s-1", state: m.SessionState = "running", node: str = "n1",
        restart: m.RestartPolicy = "never", **fields: object) -> m.SessionRecord:
    spec = m.SessionSpec(command=["sleep", "1"], restart=restart)
    fields.setdefault("created", NOW - 100)
    return m.SessionRecord(id=sid, spec=spec, state=state, node=node, **fields)  # type: ignore[arg-type]


def node(name: str, state: str = "ready") -> m.NodeInfo:
    return m.NodeInfo(name=name, state=state)  # type: ignore[arg-type]


NODES = {"n1": node("n1"), "n2": node("n2"), "gone": node("gone", "down"),
         "busy": node("busy", "draining")}


def plan(records: list[m.SessionRecord], nodes: dict[str, m.NodeInfo] = NODES, *,
         trusted: bool = True, placing: frozenset[str] = frozenset(), now: float = NOW,
         retention: float = 3600) -> list[sr.Action]:
    return sr.plan(records, nodes, trusted=trusted, placing=placing, now=now,
                   retention=retention)


# ---------------------------------------------------------------------- transitions


def test_reschedule_is_its_own_transition_with_its_own_field() -> None:
    r = rec(restart="always", pid=42, ports=[8000], restarts=2)
    new = sessionstate.reschedule(r, "node n1 lost", output_bytes=10)
    assert (new.state, new.requeued, new.node, new.pid, new.ports, new.restarts,
            new.output_bytes) == ("pending", "rescheduled", "", 0, [], 3, 10)
    assert new.reason == "rescheduling: node n1 lost"  # for people; the field is the flag


def test_back_to_pending_without_the_reschedule_field_is_illegal() -> None:
    for state in ("starting", "running"):
        r = rec(state=state, restart="always")  # type: ignore[arg-type]
        with pytest.raises(IllegalTransition, match="only a reschedule"):
            sessionstate.change(r, "pending", NOW, node="", reason="rescheduling: by text")
        # ... and the error is a typed shoal error (HTTP 409), not a bare exception
        assert issubclass(IllegalTransition, ConflictError)


def test_a_session_that_never_restarts_is_not_rescheduled() -> None:
    with pytest.raises(IllegalTransition, match="restart=never"):
        sessionstate.reschedule(rec(restart="never"), "node n1 lost")


def test_an_ended_session_is_final_for_every_writer() -> None:
    for state in sessionstate.FINAL:
        r = rec(state=state, restart="always", ended=NOW)
        with pytest.raises(sessionstate.Final):
            sessionstate.change(r, "killed", NOW)
        with pytest.raises(sessionstate.Final):
            sessionstate.reschedule(r, "late")


def test_illegal_moves_raise_and_legal_ones_stamp_the_end() -> None:
    with pytest.raises(IllegalTransition, match="pending to running"):
        sessionstate.change(rec(state="pending"), "running", NOW)
    ended = sessionstate.change(rec(), "exited", NOW, exit_code=0)
    assert (ended.state, ended.ended, ended.exit_code) == ("exited", NOW, 0)


def test_requeued_is_cleared_on_leaving_pending_and_refused_elsewhere() -> None:
    pending = sessionstate.reschedule(rec(restart="always"), "node n1 lost")
    taken = msgspec.structs.replace(pending, state="starting", node="n2")  # as an agent does
    assert sessionstate.normalized(taken).requeued == ""
    sessionstate.check_record(pending, sessionstate.normalized(taken))
    with pytest.raises(IllegalTransition, match="pending records only"):
        sessionstate.check_record(pending, taken)
    assert sessionstate.change(pending, "starting", NOW, node="n2").requeued == ""


def test_waiting_is_a_pending_to_pending_change() -> None:
    r = rec(state="pending", node="", created=NOW)
    waiting = sessionstate.change(r, "pending", NOW, requeued="waiting", reason="waiting")
    assert waiting.requeued == "waiting"


def test_old_records_without_the_field_still_decode() -> None:
    old = m.SessionRecord(id="s-1", spec=m.SessionSpec(command=["x"]))
    data = msgspec.json.encode(old).replace(b',"requeued":""', b"")
    assert b"requeued" not in data
    assert msgspec.json.decode(data, type=m.SessionRecord).requeued == ""


# ---------------------------------------------------------------------- the reconciler


def test_node_lost_reschedules_daemons_and_loses_the_rest() -> None:
    actions = plan([rec("d", node="gone", restart="always"),
                    rec("o", node="gone", restart="on-failure", state="starting"),
                    rec("p", node="gone", restart="never")])
    assert actions == [sr.Reschedule("d", "gone", "node gone lost"),
                       sr.Reschedule("o", "gone", "node gone lost"),
                       sr.Lose("p", "gone", "node gone lost")]


def test_node_back_or_ready_or_draining_changes_nothing() -> None:
    records = [rec("a", node="n1", restart="always"), rec("b", node="busy", restart="never")]
    assert plan(records) == []
    back = dict(NODES, gone=node("gone", "ready"))  # the node came back before the pass
    assert plan([rec("c", node="gone", restart="always")], back) == []


def test_a_node_nobody_knows_any_more_is_not_judged() -> None:
    assert plan([rec("a", node="forgotten", restart="always")]) == []


def test_no_verdict_on_nodes_while_the_view_is_not_trusted() -> None:
    records = [rec("d", node="gone", restart="always"), rec("p", node="gone")]
    assert plan(records, trusted=False) == []


def test_ended_sessions_on_a_lost_node_are_left_alone() -> None:
    assert plan([rec("e", node="gone", state="exited", ended=NOW - 5)]) == []


def test_requeued_records_are_placed_at_once_and_only_once() -> None:
    resched = sessionstate.reschedule(rec("r", restart="always", created=NOW), "node n1 lost")
    waiting = rec("w", state="pending", node="", created=NOW, requeued="waiting")
    assert plan([resched, waiting]) == [sr.Place("r"), sr.Place("w")]
    assert plan([resched, waiting], placing=frozenset({"r", "w"})) == []


def test_a_new_pending_record_is_its_creators_until_it_is_stale() -> None:
    fresh = rec("n", state="pending", node="", created=NOW - 1)
    assert plan([fresh]) == []
    stale = rec("n", state="pending", node="", created=NOW - sr.STALE_PENDING - 1)
    assert plan([stale]) == [sr.Place("n")]
    assert plan([stale], trusted=False) == [sr.Place("n")]  # placing asks the nodes anyway


def test_the_reason_text_is_no_longer_a_control_flag() -> None:
    """The finding: a pending record whose reason merely *said* "rescheduling" was placed at
    once. Only the field counts now."""
    r = rec("t", state="pending", node="", created=NOW, reason="rescheduling: typed by hand")
    assert plan([r]) == []


def test_old_ended_records_are_purged_after_the_retention() -> None:
    records = [rec("old", state="exited", ended=NOW - 3601),
               rec("new", state="killed", ended=NOW - 10),
               rec("zero", state="failed", ended=0.0)]
    assert plan(records) == [sr.Purge("old")]
    assert plan(records, retention=5) == [sr.Purge("old"), sr.Purge("new")]
