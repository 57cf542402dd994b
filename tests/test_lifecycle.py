"""The session lifecycle's record-level rules (shoal.logic.sessionstate) and the sessions
reconciler (shoal.logic.sessionreconcile) and the services reconciler
(shoal.logic.servicereconcile), driven without NATS: what they see in, actions out."""

from __future__ import annotations

import msgspec
import pytest

from shoal.errors import ConflictError, IllegalTransition
from shoal.logic import balance, sessionstate
from shoal.logic import servicereconcile as svc
from shoal.logic import sessionreconcile as sr
from shoal.wire import messages as m
from shoal.wire import servicetypes as st

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
        r = rec(state=state, restart="always")
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


# ---------------------------------------------------------------------- services


MONO = 500.0


def service(replicas: int = 2, **fields: object) -> st.ServiceRecord:
    spec = st.ServiceSpec(name="web", command=["serve"], replicas=replicas, drain_deadline=30)
    return st.ServiceRecord(name="web", spec=spec, created=NOW - 100, **fields)  # type: ignore[arg-type]


def replica(sid: str, node: str = "n1", state: m.SessionState = "running") -> m.SessionRecord:
    spec = st.replica_spec(service().spec, sid)
    return m.SessionRecord(id=sid, spec=spec, state=state, node=node, ports=[9000],
                           created=NOW - 50)


def pool(**health: str) -> balance.Pool:
    p = balance.Pool()
    for sid, h in health.items():
        p.replicas[sid] = balance.Replica(key=sid, host="127.0.0.1", port=9000,
                                          health=h, changed_at=MONO - 1)  # type: ignore[arg-type]
    return p


READY = {"n1": m.NodeInfo(name="n1", capacity=10), "n2": m.NodeInfo(name="n2", capacity=10)}


def splan(record: st.ServiceRecord, sessions: list[m.SessionRecord],
          p: balance.Pool | None = None, memory: svc.Memory | None = None,
          nodes: dict[str, m.NodeInfo] = READY, now_wall: float = NOW,
          now: float = MONO) -> tuple[list[svc.Action], svc.Memory]:
    return svc.plan(record, sessions, nodes, p or pool(), memory or svc.Memory(),
                    now_wall=now_wall, now=now)


def test_a_service_at_its_count_needs_nothing() -> None:
    assert splan(service(2), [replica("a"), replica("b", "n2")])[0] == []


def test_scaling_up_starts_the_missing_replicas_spread_over_the_nodes() -> None:
    actions, _ = splan(service(4), [replica("a", "n1")])
    assert actions[0] == svc.StartReplica("n2")  # the node with none of them first
    assert sorted(a.node or "" for a in actions if isinstance(a, svc.StartReplica)) \
        == ["n1", "n2", "n2"]  # two on each node in the end


def test_no_eligible_node_still_asks_for_the_replicas() -> None:
    down = {"n1": m.NodeInfo(name="n1", state="down")}
    assert splan(service(1), [], nodes=down)[0] == [svc.StartReplica(None)]


def test_scaling_down_drains_the_failing_replicas_first() -> None:
    actions, _ = splan(service(1), [replica("a"), replica("b"), replica("c")],
                       pool(a="up", b="down", c="init"))
    assert len(actions) == 1 and isinstance(actions[0], svc.MarkDraining)
    assert sorted(actions[0].ids) == ["b", "c"] and actions[0].until == NOW + 30


def test_a_draining_replica_is_killed_once_idle_or_at_its_deadline() -> None:
    record = service(1, draining={"a": NOW + 30})
    sessions = [replica("a"), replica("b")]
    busy = pool(a="up", b="up")
    busy.replicas["a"].inflight = 2
    actions, memory = splan(record, sessions, busy)
    assert actions == []  # busy, and before its deadline: it finishes its requests
    assert memory.drain_seen == {"a": MONO}
    actions, _ = splan(record, sessions, busy, memory, now_wall=NOW + 31, now=MONO + 31)
    assert actions == [svc.KillReplica("a", "service web: drain deadline reached")]
    idle = pool(a="up", b="up")
    actions, memory = splan(record, sessions, idle, memory, now=MONO + svc.MIN_DRAIN)
    assert actions == [svc.KillReplica("a", "service web: drained")]


def test_a_drained_replica_is_not_killed_before_min_drain() -> None:
    record = service(1, draining={"a": NOW + 30})
    assert splan(record, [replica("a"), replica("b")], pool(a="up", b="up"))[0] == []


def test_drain_marks_of_ended_replicas_are_forgotten() -> None:
    record = service(1, draining={"gone": NOW + 30})
    actions, _ = splan(record, [replica("a"), replica("gone", state="killed")])
    assert actions == [svc.ForgetDrains(["gone"])]


def test_a_stopped_service_drains_everything_and_starts_nothing() -> None:
    # `service drain` marks the live replicas with its deadline and stops the service
    record = service(2, stopped=True, draining={"a": NOW + 30})
    actions, memory = splan(record, [replica("a"), replica("b")])
    # b has no mark (it started after the drain): its deadline is now
    assert actions == [svc.KillReplica("b", "service web: drained")]
    actions, _ = splan(record, [replica("a"), replica("b")], memory=memory,
                       now=MONO + svc.MIN_DRAIN)
    assert [a.id for a in actions if isinstance(a, svc.KillReplica)] == ["a", "b"]
    assert not any(isinstance(a, (svc.StartReplica, svc.MarkDraining)) for a in actions)


def test_a_draining_node_hands_its_replicas_on_with_one_deadline() -> None:
    nodes = dict(READY, n1=m.NodeInfo(name="n1", state="draining", capacity=10))
    busy = pool(a="up")
    busy.replicas["a"].inflight = 1
    actions, memory = splan(service(1), [replica("a", "n1")], busy, nodes=nodes)
    assert actions == [svc.StartReplica("n2")]  # replaced at once, ended when idle
    assert memory.drain_seen["node:a"] == NOW + 30
    later, memory = splan(service(1), [replica("a", "n1")], busy, memory, nodes=nodes,
                          now_wall=NOW + 10)
    assert memory.drain_seen["node:a"] == NOW + 30  # the deadline does not move


def test_crashes_back_off_creations_and_a_healthy_replica_clears_it() -> None:
    failed = [replica("f1", state="failed")]
    actions, memory = splan(service(1), failed)
    assert actions == [] and memory.backoff == (0.5, MONO + 0.5)
    failed.append(replica("f2", state="failed"))
    actions, memory = splan(service(1), failed, memory=memory, now=MONO + 0.1)
    assert actions == [] and memory.backoff == (1.0, MONO + 1.1)
    actions, memory = splan(service(1), failed, memory=memory, now=MONO + 1.2)
    assert actions == [svc.StartReplica("n1")]  # the pause is over
    for i in range(10):  # it doubles up to MAX_BACKOFF
        failed.append(replica(f"g{i}", state="failed"))
        _, memory = splan(service(1), failed, memory=memory)
    assert memory.backoff[0] == svc.MAX_BACKOFF
    healthy = pool(ok="up")
    healthy.replicas["ok"].changed_at = MONO - svc.HEALTHY_FOR - 1
    actions, memory = splan(service(2), failed + [replica("ok")], healthy, memory)
    assert memory.backoff == (0.0, 0.0) and actions == [svc.StartReplica("n2")]


def test_probes_failing_do_not_start_or_stop_replicas_by_themselves() -> None:
    """Failing checks only steer clients away (the pool); the count is the count: a
    replica that stays down is restarted by its agent or ends, and then it is replaced."""
    assert splan(service(2), [replica("a"), replica("b", "n2")], pool(a="down", b="down"))[0] == []


def test_each_placement_records_the_node_of_its_attempt() -> None:
    """Output readers believe attempt i's chunks only from ``placements[i-1]``."""
    r = rec(state="pending", node="")
    first = msgspec.structs.replace(r, **sessionstate.placed(r, "n1"))
    assert (first.node, first.attempt, first.placements) == ("n1", 1, ["n1"])
    second = msgspec.structs.replace(first, **sessionstate.placed(first, "n2"))
    assert (second.attempt, second.placements) == (2, ["n1", "n2"])
    assert sessionstate.attempt_nodes(second) == ["n1", "n2"]
    # A record placed before placements were kept: its current node for its current attempt.
    old = msgspec.structs.replace(r, attempt=2, node="n3")
    assert sessionstate.attempt_nodes(old) == ["", "n3"]
    assert sessionstate.placed(old, "n4")["placements"] == ["", "n3", "n4"]
    assert msgspec.json.decode(b'{"id":"s","spec":{}}', type=m.SessionRecord).placements == []
