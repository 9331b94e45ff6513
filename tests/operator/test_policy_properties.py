"""Invariants of `decide` over arbitrary observations and sequences of them."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fixtures import PAPER_POOLS, paper_spec

from stepfleet.operator.policy import Observation, PolicyState, PoolObservation, decide

SPEC = paper_spec()
NAMES = [p.name for p in PAPER_POOLS]


@st.composite
def pool_observations(draw, name: str) -> PoolObservation:
    ready = draw(st.integers(0, 250))
    pending = draw(st.integers(0, 50))
    return PoolObservation(
        name=name,
        desired_replicas=ready + pending,
        ready_replicas=ready,
        pending_replicas=pending,
        price_per_hour=draw(st.one_of(st.none(), st.floats(0.05, 5.0))),
        throughput_rps_per_replica=draw(st.one_of(st.none(), st.floats(0.2, 5.0))),
        queue_depth=draw(st.floats(0, 500)),
        capacity_short_since=draw(st.one_of(st.none(), st.floats(0, 1000))),
    )


@st.composite
def observations(draw, now: float | None = None) -> Observation:
    return Observation(
        now_s=draw(st.floats(0, 10_000)) if now is None else now,
        arrival_rps=draw(st.floats(0, 800)),
        arrival_trend_rps_per_s=draw(st.floats(-1, 1)),
        pools=tuple(draw(pool_observations(n)) for n in NAMES),
    )


def _check(plan, obs):
    weights = plan.weights
    assert all(w >= 0 for w in weights.values())
    if any(p.ready_replicas > 0 for p in obs.pools):
        assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-9)
    for pool in obs.pools:
        if pool.ready_replicas == 0:
            assert weights[pool.name] == 0.0  # no traffic to a pool with nothing ready
    for spec in SPEC.pools:
        assert spec.min_replicas <= plan.replicas[spec.name] <= spec.max_replicas
        assert plan.nodepool_limits[spec.name] >= plan.replicas[spec.name]
    assert plan.reasons


@settings(max_examples=150, deadline=None)
@given(observations())
def test_every_plan_keeps_the_invariants(obs):
    plan, state = decide(obs, PolicyState(), SPEC)
    _check(plan, obs)
    assert state.mode == plan.mode


@settings(max_examples=60, deadline=None)
@given(observations())
def test_decide_is_pure(obs):
    state = PolicyState(mode="capacity", mode_since_s=0.0)
    first = decide(obs, state, SPEC)
    second = decide(obs, state, SPEC)
    assert first == second  # same inputs, same plan and state; nothing read from outside


@settings(max_examples=40, deadline=None)
@given(st.lists(observations(now=0.0), min_size=2, max_size=12))
def test_invariants_hold_along_a_run(observed):
    state = PolicyState()
    for step, obs in enumerate(observed):
        obs = Observation(now_s=60.0 * step, arrival_rps=obs.arrival_rps,
                          arrival_trend_rps_per_s=obs.arrival_trend_rps_per_s, pools=obs.pools)
        plan, state = decide(obs, state, SPEC)
        _check(plan, obs)
        for memory in state.pools:  # the scale-down window never grows without bound
            assert all(t > obs.now_s - SPEC.control.stabilization_s
                       for t, _ in memory.recommendations)
