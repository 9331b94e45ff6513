"""Failure domains: losses of ready capacity as a signal, hedging, learned provisioning, one step."""

from __future__ import annotations

from dataclasses import replace

from policy_fixtures import PAPER_POOLS, paper_spec, steady

from stepfleet.operator.policy import (
    TREND_SAMPLES,
    ControlSettings,
    PolicySpec,
    PolicyState,
    PoolSpec,
    Signals,
    SloSpec,
    StepMemory,
    control_step,
    decide,
)
from stepfleet.operator.policy.pools import resolve

READY = {"inf2": 60, "trn1": 1, "a10g": 1, "l4": 1}


def _steady_state(spec, rps=100.0, ready=None):
    """Two decisions on a fleet that serves `rps` from inf2, so memory knows what was ready."""
    ready = ready or READY
    _, state = decide(steady(spec, 0.0, rps, ready=ready), PolicyState(), spec)
    plan, state = decide(steady(spec, 60.0, rps, ready=ready), state, spec)
    return plan, state


def _servable(spec, plan, now, names):
    pools = resolve(spec, steady(spec, now, 0.0, ready=plan.replicas))
    return sum(p.servable(plan.replicas[p.name]) for p in pools if p.name in names)


def test_losing_ready_replicas_turns_on_capacity_mode_in_the_same_decision():
    spec = paper_spec()
    plan, state = _steady_state(spec)
    assert plan.mode == "cost"
    lost = {**READY, "inf2": 20}  # 40 of 60 ready replicas gone; no scheduler said anything
    plan, state = decide(steady(spec, 120.0, 100.0, ready=lost, desired={"inf2": 60}), state, spec)
    assert plan.mode == "capacity" and plan.mode_changed
    assert plan.newly_lost == ("inf2",) and dict(plan.short) == {"inf2": 120.0}
    assert any(r.startswith("inf2 lost ready capacity: 20 ready of 60") for r in plan.reasons)
    assert any(r.startswith("entering capacity mode: inf2") for r in plan.reasons)
    # The deficit goes only to pools ready before inf2's replacement (600 s): a10g and l4 (480 s).
    assert any(r.endswith("a10g, l4") and r.startswith("bridging") for r in plan.reasons)
    assert plan.replicas["a10g"] > 1 and plan.replicas["l4"] > 1
    # Still lost at the next decision: no new loss, still short.
    plan, state = decide(steady(spec, 180.0, 100.0, ready=lost, desired={"inf2": 60}), state, spec)
    assert plan.newly_lost == () and "inf2" in dict(plan.short)
    # Replacements ready: the loss is over.
    plan, _ = decide(steady(spec, 720.0, 100.0, ready=READY), state, spec)
    assert "inf2" not in dict(plan.short)
    assert any(r.startswith("inf2 regained its ready capacity") for r in plan.reasons)


def test_a_small_dip_or_a_planned_scale_down_is_no_loss():
    spec = paper_spec()
    _, state = _steady_state(spec)
    dip = {**READY, "inf2": 50}  # 10 of 60: below the 25 % loss fraction
    plan, _ = decide(steady(spec, 120.0, 100.0, ready=dip, desired={"inf2": 60}), state, spec)
    assert plan.newly_lost == () and plan.mode == "cost"
    # The plan itself asked for fewer: ready follows the plan down, nothing was lost.
    spec = paper_spec(stabilization_s=0, scale_down_per_min=10)
    _, state = _steady_state(spec)
    low, state = decide(steady(spec, 120.0, 10.0), state, spec)
    plan, _ = decide(steady(spec, 180.0, 10.0, ready={"inf2": low.replicas["inf2"]}), state, spec)
    assert plan.newly_lost == ()


def test_a_domain_that_lost_capacity_is_hedged_afterwards():
    spec = paper_spec(dwell_s=0, recovery_window_s=0)
    _, state = _steady_state(spec)
    lost = {**READY, "inf2": 0}
    _, state = decide(steady(spec, 120.0, 100.0, ready=lost, desired={"inf2": 60}), state, spec)
    plan, _ = decide(steady(spec, 900.0, 100.0, ready=READY), state, spec)
    assert plan.mode == "cost"
    # Capacity outside inf2 now carries the planned demand on its own.
    assert _servable(spec, plan, 900.0, {"trn1", "a10g", "l4"}) >= 100.0
    assert any(r.startswith("hedging failure domains: inf2") for r in plan.reasons)
    assert any("hedge" in r and "min to replace" in r for r in plan.reasons)
    # Without the loss memory, the same fleet is not hedged (on-demand domains are not, by default).
    plan, _ = decide(steady(spec, 900.0, 100.0, ready=READY), PolicyState(), spec)
    assert not any("hedging" in r for r in plan.reasons)


def test_a_spot_domain_is_hedged_with_on_demand_at_the_least_cost():
    spot = PoolSpec("inf2-spot", 0.30, 1.75, 0.67, provision_s=540, min_replicas=0, max_replicas=200,
                    failure_domain="spot/us-east-1a/inf2", capacity_type="spot")
    spec = PolicySpec(slo=SloSpec(latency_s=3.0), pools=(spot, *PAPER_POOLS),
                      control=ControlSettings(hedge_spot=0.5))
    plan, _ = decide(steady(spec, 0.0, 100.0), PolicyState(), spec)
    outside = {p.name for p in PAPER_POOLS}
    assert _servable(spec, plan, 0.0, outside) >= 0.5 * plan.planned_rps
    assert plan.replicas["inf2-spot"] > 10  # spot still carries its part: the hedge is not a copy
    assert any("as a hedge for spot/us-east-1a/inf2: 10 min to replace" in r for r in plan.reasons)
    unhedged = replace(spec, control=ControlSettings(hedge_spot=0.0))
    cheap, _ = decide(steady(spec, 0.0, 100.0), PolicyState(), unhedged)
    assert cheap.cost_per_hour < plan.cost_per_hour


def test_provisioning_time_is_learned_from_the_pool():
    spec = paper_spec(stabilization_s=0)
    first, state = decide(steady(spec, 0.0, 0.5, ready={"inf2": 1}), PolicyState(), spec)
    assert first.replicas["inf2"] == 1  # nothing asked yet
    asked, state = decide(steady(spec, 60.0, 60.0, ready={"inf2": 1}), state, spec)
    n = asked.replicas["inf2"]
    # Still starting at the next decision; ready 300 s after they were asked (declared: 600 s).
    _, state = decide(steady(spec, 120.0, 60.0, ready={"inf2": 1}, pending={"inf2": n - 1}), state, spec)
    plan, state = decide(steady(spec, 360.0, 60.0, ready={"inf2": n}), state, spec)
    assert state.memory("inf2").provision_s == 300.0
    plan, _ = decide(steady(spec, 420.0, 60.0, ready={"inf2": n}), state, spec)
    assert any("planning 660s ahead" in r for r in plan.reasons)  # trn1 still says 600


def test_the_control_step_fits_demand_then_decides():
    spec = paper_spec()
    memory = StepMemory()
    pools = steady(spec, 0.0, 0.0).pools
    plan, memory = control_step(memory, Signals(arrival_rps=None, window_s=60.0, pools=pools), spec, 0.0)
    assert plan is None and memory == StepMemory()  # nothing measured: nothing decided
    for k in range(1, TREND_SAMPLES + 5):
        plan, memory = control_step(memory, Signals(arrival_rps=50.0, window_s=60.0, pools=pools), spec, 60.0 * k)
    assert plan is not None and memory.plan is plan
    assert len(memory.samples) == TREND_SAMPLES
    assert abs(memory.demand_rps - 50.0) < 1e-6
    direct, _ = decide(steady(spec, 60.0 * k, 50.0), memory.state, spec)
    assert direct.planned_rps == plan.planned_rps
