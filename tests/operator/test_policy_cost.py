"""Cost mode: the cheapest fleet per image that covers the planned demand."""

from __future__ import annotations

import math

from policy_fixtures import paper_spec, steady, with_pool

from stepfleet.operator.policy import PolicySpec, PolicyState, PoolSpec, SloSpec, decide
from stepfleet.operator.policy.costmodel import price_per_image


def test_demand_beyond_minimums_goes_to_the_cheapest_pool_per_image():
    spec = paper_spec()
    plan, state = decide(steady(spec, 0, 60.0, ready={"inf2": 40}), PolicyState(), spec)
    assert plan.mode == "cost" and state.mode == "cost"
    assert plan.replicas["inf2"] >= 30
    assert {plan.replicas[n] for n in ("trn1", "a10g", "l4")} == {1}
    assert any("cheapest per image first: inf2" in r for r in plan.reasons)


def test_price_per_image_not_per_hour_decides():
    # "fast" costs more per hour but less per image than "cheap-hour".
    spec = PolicySpec(slo=SloSpec(3.0), pools=(
        PoolSpec("cheap-hour", 0.8, 1.0, 0.5, max_replicas=100),
        PoolSpec("fast", 1.0, 2.0, 0.5, max_replicas=100),
    ))
    assert price_per_image(1.0, 2.0) < price_per_image(0.8, 1.0)
    plan, _ = decide(steady(spec, 0, 20.0, ready={"fast": 12}), PolicyState(), spec)
    assert plan.replicas["cheap-hour"] == 0
    assert plan.replicas["fast"] >= 10


def test_planned_capacity_covers_demand_with_headroom():
    spec = paper_spec(headroom=0.1)
    plan, _ = decide(steady(spec, 0, 80.0, ready={"inf2": 60}), PolicyState(), spec)
    assert math.isclose(plan.planned_rps, 88.0)
    capacity = sum(plan.replicas[p.name] * p.throughput_rps_per_replica for p in spec.pools)
    assert capacity >= 88.0


def test_pool_maximum_overflows_to_the_next_cheapest():
    pools = list(paper_spec().pools)
    pools[0] = PoolSpec("inf2", 0.7582, 1.75, 0.67, min_replicas=1, max_replicas=10)
    spec = PolicySpec(slo=SloSpec(3.0), pools=tuple(pools))
    plan, _ = decide(steady(spec, 0, 60.0, ready={"inf2": 10, "trn1": 20}), PolicyState(), spec)
    assert plan.replicas["inf2"] == 10
    assert plan.replicas["trn1"] > 1  # trn1 is next cheapest per image
    assert plan.replicas["l4"] == 1


def test_a_pool_that_cannot_meet_the_slo_gets_its_minimum_and_no_traffic():
    spec = PolicySpec(slo=SloSpec(1.0), pools=(
        PoolSpec("slow", 0.1, 5.0, 2.0, min_replicas=1, max_replicas=50),
        PoolSpec("fast", 1.0, 1.0, 0.3, min_replicas=0, max_replicas=50),
    ))
    plan, _ = decide(steady(spec, 0, 10.0, ready={"slow": 4, "fast": 15}), PolicyState(), spec)
    assert plan.replicas["fast"] >= 10
    assert plan.weights["slow"] == 0.0
    assert plan.weights["fast"] == 1.0


def test_observed_price_overrides_the_spec():
    spec = paper_spec()
    cheap_a10g = {"a10g": 0.45}  # $0.083 per 1k images: cheaper than inf2
    plan, _ = decide(steady(spec, 0, 60.0, prices=cheap_a10g), PolicyState(), spec)
    assert plan.replicas["a10g"] > 30
    assert plan.replicas["inf2"] == 1


def test_a_serving_pool_keeps_its_place_unless_another_is_clearly_cheaper():
    spec = paper_spec()
    barely = {"a10g": 1.5 * 0.7582 / 1.75 * 0.98}  # 2 % cheaper per image than inf2
    ready = {"inf2": 40}
    plan, _ = decide(steady(spec, 0, 60.0, ready=ready, prices=barely), PolicyState(), spec)
    assert plan.replicas["inf2"] >= 30 and plan.replicas["a10g"] == 1
    plan, _ = decide(steady(spec, 0, 60.0, ready=ready, prices=barely), PolicyState(),
                     paper_spec(switch_margin=0.0))
    assert plan.replicas["a10g"] > 30


def test_a_rising_trend_is_planned_one_provisioning_delay_ahead():
    spec = paper_spec()
    flat, _ = decide(steady(spec, 0, 60.0), PolicyState(), spec)
    rising, _ = decide(steady(spec, 0, 60.0, trend=0.01), PolicyState(), spec)
    falling, _ = decide(steady(spec, 0, 60.0, trend=-0.01), PolicyState(), spec)
    lookahead = spec.control.interval_s + 600  # the slowest pool's provisioning delay
    assert math.isclose(rising.planned_rps, (60.0 + 0.01 * lookahead) * 1.03)
    assert rising.replicas["inf2"] > flat.replicas["inf2"]
    assert falling.planned_rps == flat.planned_rps  # never planned below the current rate


def test_cost_per_hour_and_reasons_are_reported():
    spec = paper_spec()
    plan, _ = decide(steady(spec, 0, 30.0), PolicyState(), spec)
    assert math.isclose(plan.cost_per_hour,
                        sum(plan.replicas[p.name] * p.price_per_hour for p in spec.pools))
    assert plan.reasons[0].startswith("demand 30.00 rps")
    assert any(r.startswith("weights") for r in plan.reasons)


def test_a_pool_breaking_the_slo_is_named_in_the_reasons():
    spec = paper_spec()
    obs = with_pool(steady(spec, 0, 30.0, ready={"inf2": 20}), "inf2", latency_s=4.2,
                    queue_depth=80)
    plan, _ = decide(obs, PolicyState(), spec)
    assert any(r.startswith("inf2 measured p95 latency 4.20s over the 3.00s target")
               for r in plan.reasons)


def test_max_pool_share_spreads_the_cost_plan_for_resilience():
    spec = paper_spec(max_pool_share=0.5)
    plan, _ = decide(steady(spec, 0, 100.0), PolicyState(), spec)
    inf2 = plan.replicas["inf2"] * 1.75
    assert inf2 <= 0.55 * plan.planned_rps
    assert plan.replicas["trn1"] > 1  # the next cheapest takes the rest
    assert plan.replicas["l4"] == 1
