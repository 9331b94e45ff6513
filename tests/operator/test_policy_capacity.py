"""Capacity mode: entering on a shortage the cost plan relies on, spreading, leaving late."""

from __future__ import annotations

from policy_fixtures import paper_spec, steady

from stepfleet.operator.policy import PolicyState, decide

READY = {"inf2": 60, "trn1": 1, "a10g": 1, "l4": 1}


def _short_inf2(spec, now, rps=110.0, state=None, ready=None, pending=None):
    obs = steady(spec, now, rps, ready=ready or READY, short={"inf2": 100.0},
                 pending=pending if pending is not None else {"inf2": 8})
    return decide(obs, state or PolicyState(), spec)


def test_short_pool_the_cost_plan_relies_on_switches_to_capacity_mode():
    spec = paper_spec()
    plan, state = _short_inf2(spec, 120.0)
    assert plan.mode == "capacity" and plan.mode_changed
    assert state.mode == "capacity" and state.mode_since_s == 120.0
    assert any(r.startswith("entering capacity mode: inf2 short since t=100s") for r in plan.reasons)


def test_short_pool_the_plan_does_not_need_is_only_noted():
    spec = paper_spec()
    obs = steady(spec, 120.0, 5.0, ready={"inf2": 4}, short={"l4": 100.0})
    plan, state = decide(obs, PolicyState(), spec)
    assert plan.mode == "cost" and not plan.mode_changed
    assert any("l4 short since" in r and "needs no more of it" in r for r in plan.reasons)


def test_capacity_mode_spreads_the_deficit_in_proportion_to_what_pools_can_serve():
    spec = paper_spec()
    plan, _ = _short_inf2(spec, 120.0)
    added = {n: plan.replicas[n] * p.throughput_rps_per_replica
             for n, p in ((p.name, p) for p in spec.pools) if n != "inf2"}
    # Shares follow throughput x max replicas: trn1 > a10g > l4, each gets a real part.
    assert added["trn1"] > added["a10g"] > added["l4"] > 1.0
    assert any("spread over pools with capacity" in r for r in plan.reasons)


def test_short_pool_keeps_warm_replicas_and_asks_for_what_cost_wanted():
    spec = paper_spec()
    plan, _ = _short_inf2(spec, 120.0)
    assert plan.replicas["inf2"] >= READY["inf2"]  # warm, and the pending probe stays
    assert any("inf2 keeps 60 ready and asks for" in r for r in plan.reasons)


def test_short_pool_gets_only_traffic_its_ready_replicas_serve():
    spec = paper_spec()
    plan, _ = _short_inf2(spec, 120.0, ready={"inf2": 10, "trn1": 30, "a10g": 30, "l4": 30})
    capacity = {"inf2": 10 * 1.75, "trn1": 30 * 2.1667, "a10g": 30 * 1.5, "l4": 30 * 1.0167}
    share = capacity["inf2"] / sum(capacity.values())
    assert plan.weights["inf2"] < share * 1.1


def _run_shortage(spec, recovered_at, until, step=60.0):
    """Short from t=120 until `recovered_at`; returns (time, plan) for every step."""
    state = PolicyState()
    out = []
    t = 120.0
    while t <= until:
        short = {"inf2": 100.0} if t < recovered_at else None
        obs = steady(spec, t, 110.0, ready=READY, short=short,
                     pending={"inf2": 8} if t < recovered_at else {})
        plan, state = decide(obs, state, spec)
        out.append((t, plan))
        t += step
    return out


def test_leaves_only_after_recovery_window_and_dwell():
    spec = paper_spec(dwell_s=1800, recovery_window_s=600)
    plans = _run_shortage(spec, recovered_at=600.0, until=4000.0)
    modes = {t: p.mode for t, p in plans}
    left = min(t for t, p in plans if p.mode == "cost" and t > 120)
    # Entered at 120; capacity back at 600 -> window ends 1200; dwell ends 1920.
    assert left == 1920.0
    assert all(modes[t] == "capacity" for t in modes if 120 <= t < 1920)
    leave = next(p for t, p in plans if t == left)
    assert leave.mode_changed and any(r.startswith("leaving capacity mode") for r in leave.reasons)


def test_recovery_window_outlasts_a_short_dwell():
    spec = paper_spec(dwell_s=60, recovery_window_s=900)
    plans = _run_shortage(spec, recovered_at=300.0, until=2000.0)
    left = min(t for t, p in plans if p.mode == "cost" and t > 120)
    assert left == 1200.0  # capacity seen from 300, plus the 900 s window
    waiting = next(p for t, p in plans if t == 600.0)
    assert any("recovery window left" in r for r in waiting.reasons)


def test_shortage_returning_inside_the_window_restarts_it():
    spec = paper_spec(dwell_s=0, recovery_window_s=600)
    state = PolicyState()
    timeline = [(120, True), (180, False), (600, True), (660, False), (1200, False), (1260, False)]
    modes = {}
    for t, short in timeline:
        obs = steady(spec, float(t), 110.0, ready=READY,
                     short={"inf2": float(t)} if short else None,
                     pending={"inf2": 8} if short else {})
        plan, state = decide(obs, state, spec)
        modes[t] = plan.mode
    assert modes[1200] == "capacity"  # 660 + 600 not reached
    assert modes[1260] == "cost"


def test_forced_modes():
    cost_only = paper_spec()
    cost_only = type(cost_only)(slo=cost_only.slo, pools=cost_only.pools, mode="cost")
    plan, _ = _short_inf2(cost_only, 120.0)
    assert plan.mode == "cost"
    spread = type(cost_only)(slo=cost_only.slo, pools=cost_only.pools, mode="capacity")
    plan, _ = decide(steady(spread, 0, 50.0), PolicyState(), spread)
    assert plan.mode == "capacity"
    assert all(plan.replicas[n] > 1 for n in ("inf2", "trn1", "a10g", "l4"))
