"""Scale up at once, down after the window and gradually, never break before making."""

from __future__ import annotations

from policy_fixtures import paper_spec, steady

from stepfleet.operator.policy import PolicyState, decide


def test_scale_up_is_immediate():
    spec = paper_spec()
    _, state = decide(steady(spec, 0, 10.0, ready={"inf2": 5}), PolicyState(), spec)
    plan, _ = decide(steady(spec, 60, 100.0, ready={"inf2": 5}), state, spec)
    assert plan.replicas["inf2"] > 50


def test_scale_down_waits_for_the_window_then_keeps_a_buffer_it_releases_gradually():
    spec = paper_spec(stabilization_s=300, scale_down_per_min=0.1, scale_down_buffer=0.25)
    state = PolicyState()
    ready = 60
    history = {}
    plans = {}
    for t in range(0, 1800, 60):
        rps = 100.0 if t < 120 else 20.0
        plan, state = decide(steady(spec, float(t), rps, ready={"inf2": ready}), state, spec)
        history[t], plans[t] = plan.replicas["inf2"], plan
        ready = plan.replicas["inf2"]
    # The last high recommendation was at t=60: held for the 300 s window after it.
    assert history[60] >= 60 and history[300] >= 60
    # Then at once down to 25 % spare capacity above the plan for 20 rps...
    spare = 1.25 * plans[360].planned_rps
    capacity = 1.75 * 0.97  # per inf2 replica at this size, roughly
    assert history[360] < 60 and abs(history[360] * capacity + 3 - spare) < 3 * capacity
    assert any("down gradually" in r for r in plans[360].reasons)
    # ...and that spare goes at most 10 % of the ready replicas per minute.
    for t in range(360, 1740, 60):
        assert 0 <= history[t] - history[t + 60] <= max(1, history[t] // 10)
    assert history[1740] < history[360]


def test_with_a_large_buffer_scale_down_is_gradual_all_the_way():
    spec = paper_spec(stabilization_s=0, scale_down_per_min=0.1, scale_down_buffer=10.0)
    _, state = decide(steady(spec, 0, 100.0, ready={"inf2": 60}), PolicyState(), spec)
    plan, _ = decide(steady(spec, 60, 10.0, ready={"inf2": 60}), state, spec)
    assert plan.replicas["inf2"] == 54


def test_first_decision_keeps_what_runs_before_demand_is_known():
    spec = paper_spec()
    plan, _ = decide(steady(spec, 0, 0.0, ready={"inf2": 30, "a10g": 5}), PolicyState(), spec)
    assert plan.replicas["inf2"] == 30 and plan.replicas["a10g"] == 5


def test_no_pool_shrinks_while_ready_capacity_elsewhere_falls_short():
    spec = paper_spec(stabilization_s=0, scale_down_per_min=10)
    # a10g carries the load; the cost plan wants inf2, whose replicas are still starting.
    obs = steady(spec, 0, 60.0, ready={"inf2": 1, "a10g": 50}, pending={"inf2": 40},
                 desired={"inf2": 41, "a10g": 50})
    plan, _ = decide(obs, PolicyState(), spec)
    assert plan.replicas["a10g"] == 50
    assert any(r.startswith("holding a10g at 50") for r in plan.reasons)
    # Once inf2 is ready the a10g replicas may go.
    obs = steady(spec, 60, 60.0, ready={"inf2": 41, "a10g": 50})
    plan, _ = decide(obs, PolicyState(), spec)
    assert plan.replicas["a10g"] == 1


def test_replicas_stay_within_min_and_max():
    spec = paper_spec(stabilization_s=0, scale_down_per_min=10)
    plan, _ = decide(steady(spec, 0, 0.0, ready={"inf2": 0, "trn1": 0, "a10g": 0, "l4": 0}),
                     PolicyState(), spec)
    assert all(plan.replicas[p.name] >= p.min_replicas for p in spec.pools)
    plan, _ = decide(steady(spec, 0, 5000.0), PolicyState(), spec)
    assert all(plan.replicas[p.name] <= p.max_replicas for p in spec.pools)
    assert any("exceed every pool's maximum" in r for r in plan.reasons)


def test_nodepool_limits_allow_a_surge_above_the_plan():
    spec = paper_spec()
    plan, _ = decide(steady(spec, 0, 60.0, ready={"inf2": 40}), PolicyState(), spec)
    for pool in spec.pools:
        limit = plan.nodepool_limits[pool.name]
        assert plan.replicas[pool.name] < limit <= max(pool.max_replicas, plan.replicas[pool.name])


def test_weights_move_off_replicas_the_plan_releases():
    spec = paper_spec(stabilization_s=0, scale_down_per_min=10, switch_margin=0.0)
    # a10g became cheaper and its new replicas are ready: inf2 is released at once.
    obs = steady(spec, 0, 60.0, ready={"inf2": 40, "a10g": 45}, prices={"a10g": 0.45})
    plan, _ = decide(obs, PolicyState(), spec)
    assert plan.replicas["inf2"] == 1
    assert plan.weights["inf2"] < 0.05
