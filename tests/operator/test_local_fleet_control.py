"""`stepfleet up` tells the router its decisions (issue 16): `router.yaml`'s `control` section,
written by `operator/local/fleet.py`, read by the router's `GET /v1/fleet` (`fleet_view`)."""

from __future__ import annotations

from stepfleet.operator.local import fleet
from stepfleet.operator.local.supervise import WorkerView
from stepfleet.operator.policy import records
from stepfleet.operator.policy.model import Plan, PoolPlan
from stepfleet.serving.router.config import parse_config
from stepfleet.serving.router.fleet_view import fleet_view
from stepfleet.serving.router.state import FleetState


def _plan(mode: str, weight: float, reason: str) -> Plan:
    return Plan(mode=mode, pools=(PoolPlan("cpu", 2, weight, 2, 0.2), PoolPlan("spot", 1, 1 - weight, 1, 0.04)),
                reasons=(reason,))


def test_the_routers_fleet_view_shows_what_the_local_loop_decided_newest_first():
    pools = (fleet.LocalPool("cpu", 0.10), fleet.LocalPool("spot", 0.04))
    workers = [WorkerView(name="cpu-1", pool="cpu", phase="ready", started_s=0.0, url="http://127.0.0.1:9001"),
               WorkerView(name="spot-1", pool="spot", phase="starting", started_s=0.0, url="http://127.0.0.1:9002")]
    decisions = [records.decision_record(_plan("cost", 1.0, "cheapest first"), 100.0),
                 records.decision_record(_plan("capacity", 0.25, "spot is short: spreading"), 130.0)]
    text = fleet.render_router_config(fleet.router_config(
        pools, workers, {"cpu": 0.25, "spot": 0.75}, "mini-sd", records.control_section("capacity", decisions)))
    config = parse_config(text)
    state = FleetState()
    state.apply_config(config)
    view = fleet_view(config, state.snapshot(0.0))
    assert view["mode"] == "capacity" and view["model"] == "mini-sd"
    assert [d["at"] for d in view["decisions"]] == [130.0, 100.0]
    assert view["decisions"][0]["reasons"] == ["spot is short: spreading"]
    assert view["decisions"][0]["replicas"] == {"cpu": 2, "spot": 1}
    assert [p["name"] for p in view["pools"]] == ["cpu"]  # a pool without a ready worker is not routed to


def test_a_control_section_the_router_cannot_read_never_blocks_the_config():
    config = parse_config("version: 1\npools:\n- {name: a, url: 'http://127.0.0.1:1', weight: 1}\n"
                          "control: {mode: cost, decisions: [{at: soon, reasons: 7}]}\n")
    state = FleetState()
    state.apply_config(config)
    view = fleet_view(config, state.snapshot(0.0))
    assert view["mode"] is None and view["decisions"] == [] and view["pools"][0]["weight"] == 1.0


def test_the_operator_records_a_decision_only_when_the_weights_or_the_mode_change():
    """`next_control`: the ConfigMap is rewritten only when routing changes, so a tick that
    changes nothing must leave the section (and so the ConfigMap) as it is."""
    first = records.next_control(None, _plan("cost", 1.0, "cheapest first"), {"cpu": 1.0, "spot": 0.0}, {}, 100.0)
    assert first["mode"] == "cost" and [d["reasons"] for d in first["decisions"]] == [["cheapest first"]]
    same = records.next_control(first, _plan("cost", 1.0, "still cheapest"), {"cpu": 1.0, "spot": 0.0},
                                {"cpu": 1.0, "spot": 0.0}, 130.0)
    assert same == first
    moved = records.next_control(first, _plan("cost", 0.5, "spot is cheaper now"), {"cpu": 0.5, "spot": 0.5},
                                 {"cpu": 1.0, "spot": 0.0}, 160.0)
    assert [d["at"] for d in moved["decisions"]] == [160.0, 100.0]
    switched = records.next_control(moved, _plan("capacity", 0.5, "spot is short"), {"cpu": 0.5, "spot": 0.5},
                                    {"cpu": 0.5, "spot": 0.5}, 190.0)
    assert switched["mode"] == "capacity" and switched["decisions"][0]["reasons"] == ["spot is short"]
    many = switched
    for k in range(10):
        many = records.next_control(many, _plan("cost", k / 10, f"step {k}"), {"cpu": k / 10}, {"cpu": -1.0}, 200.0 + k)
    assert len(many["decisions"]) == records.DECISIONS_KEPT and many["decisions"][0]["reasons"] == ["step 9"]
    assert records.next_control("garbage", _plan("cost", 1.0, "x"), {}, {}, 1.0)["decisions"][0]["reasons"] == ["x"]
