"""The baselines do what their descriptions say: HPA arithmetic, static sizing, the paper's loop."""

from __future__ import annotations

import math

import pytest
from sim_fixtures import POOL_A, scenario

from stepfleet.operator.simulator.baselines import (
    BASELINE_UTILIZATION,
    HpaBaseline,
    PaperLoop,
    StaticCheapest,
    StaticMixed,
    fixed_weights,
)
from stepfleet.operator.simulator.hpa import Hpa
from stepfleet.operator.simulator.runner import draw, run_policy
from stepfleet.operator.simulator.scenario import load_builtin


def test_hpa_proposes_ceil_of_metric_over_target_outside_the_tolerance():
    hpa = Hpa(min_replicas=1, max_replicas=100, target_per_pod=2.0)
    assert hpa.desired(0, 10, 21.0) == 10  # ratio 1.05: inside the 10 % tolerance
    assert hpa.desired(15, 10, 30.0) == 15
    assert hpa.desired(30, 15, 200.0) == 30  # at most double (or +4) per period


def test_hpa_scale_down_takes_the_highest_proposal_of_five_minutes():
    hpa = Hpa(min_replicas=1, max_replicas=100, target_per_pod=1.0)
    assert hpa.desired(0, 20, 20.0) == 20
    assert hpa.desired(15, 20, 5.0) == 20
    assert hpa.desired(299, 20, 5.0) == 20
    assert hpa.desired(301, 20, 5.0) == 5


def test_hpa_respects_min_and_max():
    hpa = Hpa(min_replicas=2, max_replicas=6, target_per_pod=1.0)
    assert hpa.desired(0, 4, 100.0) == 6
    hpa = Hpa(min_replicas=2, max_replicas=6, target_per_pod=1.0)
    assert hpa.desired(400, 4, 0.0) == 2


def test_static_cheapest_puts_everything_on_the_cheapest_pool_sized_for_peak():
    sc = scenario(load={"kind": "cosine", "base_rps": 1, "peak_rps": 9, "period_s": 1200})
    actions = StaticCheapest(sc).step(None)
    assert actions.weights == {"a": 1.0, "b": 0.0}
    assert actions.replicas == {"a": math.ceil(9 / (2.0 * BASELINE_UTILIZATION)), "b": 0}


def test_static_mixed_and_hpa_use_the_paper_weights_of_the_builtins():
    sc = load_builtin("diurnal")
    weights = fixed_weights(sc)
    assert weights == pytest.approx({"inf2": 0.4, "trn1": 0.2, "a10g": 0.3, "l4": 0.1})
    mixed = StaticMixed(sc).step(None)
    assert mixed.weights == weights
    assert mixed.replicas["inf2"] == math.ceil(120 * 0.4 / (1.75 * BASELINE_UTILIZATION))
    assert HpaBaseline(sc).weights == weights


def test_without_weights_fixed_weights_follow_inverse_price_per_image():
    weights = fixed_weights(scenario())
    assert weights["a"] == pytest.approx(2 * weights["b"])


def test_hpa_baseline_targets_eighty_percent_of_throughput():
    sc = scenario()
    assert HpaBaseline(sc).hpas["a"].target_per_pod == pytest.approx(2.0 * 0.8)


def test_paper_loop_flips_to_round_robin_on_a_capacity_error_and_back_at_the_trough():
    sc = scenario(
        duration_s=7200,
        pools=[dict(scenario().pools[0].model_dump(), min_replicas=1, weight=80),
               dict(scenario().pools[1].model_dump(), min_replicas=1, initial_replicas=1,
                    weight=20)],
        load={"kind": "cosine", "base_rps": 2, "peak_rps": 14, "period_s": 3600},
        events=[{"at_s": 600, "kind": "capacity_short", "pool": "a", "duration_s": 1500}])
    log = run_policy(sc, "paper", draw(sc))
    modes = [(tick.t, tick.mode) for tick in log.timeline]
    entered = min(t for t, m in modes if m == "capacity")
    assert entered % 300 == 0 and entered > 600  # noticed at a 300 s poll
    left = min(t for t, m in modes if m == "cost" and t > entered)
    assert 3000 <= left <= 4200  # the next trough is at t=3600
    # Capacity mode weights follow ready pods (one Service over all of them).
    tick = next(tick for tick in log.timeline if tick.t == entered + 15)
    assert tick.weights[0] / tick.weights[1] == pytest.approx(tick.ready[0] / tick.ready[1],
                                                              rel=1e-3)


def test_paper_loop_targets_breaking_point_then_adjusted_throughput():
    sc = load_builtin("diurnal")
    loop = PaperLoop(sc)
    assert loop.hpas["inf2"].target_per_pod == 1.75
    mean = (1.75 + 2.1667 + 1.5 + 1.0167) / 4
    assert loop.adjusted == pytest.approx({"inf2": mean, "trn1": mean, "a10g": 1.5,
                                           "l4": 1.0167})


def test_spothedge_spreads_over_three_domains_so_any_one_can_be_lost():
    sc = scenario(pools=[
        {**POOL_A, "name": name, "price_per_hour": price, "initial_replicas": 2}
        for name, price in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))])
    log = run_policy(sc, "spothedge", draw(sc))
    last = log.timeline[-1]
    desired = dict(zip([p.name for p in sc.pools], last.desired, strict=True))
    # 4 rps at 80 %: 5 rps of target, half of it on each of the three cheapest domains.
    assert desired["d"] == 0
    for name in ("a", "b", "c"):
        assert desired[name] * 2.0 >= 2.5
    assert desired["a"] * 2.0 + desired["b"] * 2.0 >= 5.0  # c lost: a and b still hold the target


def test_spothedge_avoids_a_domain_that_was_just_preempted():
    sc = scenario(pools=[
        {**POOL_A, "name": name, "price_per_hour": price, "initial_replicas": 2}
        for name, price in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))],
        events=[{"at_s": 150, "kind": "outage", "pool": "a"}])
    log = run_policy(sc, "spothedge", draw(sc))
    after = [t for t in log.timeline if 180 <= t.t <= 500]
    assert after and all(t.desired[3] > 0 for t in after)  # d replaces a among the three


@pytest.mark.parametrize("name", ["cheap-pool-lost", "two-domains-lost", "hedge-price-flip"])
def test_the_hedging_scenarios_load(name):
    sc = load_builtin(name)
    assert sc.duration_s == 86400 and sc.events
