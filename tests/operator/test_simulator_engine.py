"""The fleet and engine: serving, billing, capacity, losses, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_fixtures import Fixed, scenario

from stepfleet.operator.simulator.controller import Actions
from stepfleet.operator.simulator.engine import Draws, simulate
from stepfleet.operator.simulator.load import arrivals, rate_at
from stepfleet.operator.simulator.metrics import summarize
from stepfleet.operator.simulator.runner import draw, run
from stepfleet.operator.simulator.view import RequestLog


def _run(sc, controller):
    return simulate(sc, controller, draw(sc))


def test_idle_replicas_answer_in_their_latency_and_bill_by_the_hour():
    sc = scenario()
    log = _run(sc, Fixed(weights={"a": 1.0}))
    latency = log.log.latency_np
    assert (latency >= 0).all()
    assert np.percentile(latency, 50) == pytest.approx(0.5, abs=0.05)
    # 5 replicas of $3.60/h for 600 s, nothing else.
    assert log.pool_cost_usd == {"a": pytest.approx(3.0), "b": 0.0}
    result = summarize(log)
    assert result.slo_attainment > 0.99
    assert result.cost_per_1k_images == pytest.approx(3.0 / result.served * 1000)


def test_a_busy_replica_serves_exactly_its_throughput():
    sc = scenario(pools=[dict(scenario().pools[0].model_dump(), initial_replicas=1)],
                  load={"kind": "constant", "rps": 6.0}, timeout_s=1000)
    log = _run(sc, Fixed(weights={"a": 1.0}))
    served = log.log.latency_np >= 0
    finish = log.log.arrival_s[served] + log.log.latency_np[served]
    done_by_end = (finish <= sc.duration_s).sum()
    assert done_by_end == pytest.approx(2.0 * sc.duration_s, rel=0.01)


def test_overload_fills_the_queue_bound_then_turns_requests_away():
    sc = scenario(load={"kind": "constant", "rps": 20.0})  # 5 replicas serve 10 rps
    result = summarize(_run(sc, Fixed(weights={"a": 1.0})))
    assert result.dropped_by_reason["queue_full"] > 0.4 * result.requests
    assert result.latency_p95_s == pytest.approx(10.5, abs=0.6)  # timeout + latency


def test_traffic_to_a_pool_without_ready_replicas_fails():
    result = summarize(_run(scenario(), Fixed(weights={"a": 0.5, "b": 0.5})))
    assert result.dropped_by_reason["no_ready_replica"] == pytest.approx(
        result.requests / 2, rel=0.1)


def test_new_replicas_bill_from_launch_and_serve_after_provisioning():
    sc = scenario(load={"kind": "constant", "rps": 1.0})
    controller = Fixed(replicas={"a": 5, "b": 2}, weights={"a": 0.5, "b": 0.5})
    log = _run(sc, controller)
    # b: 2 replicas billed from t=0 at $7.20/h; the first 50 s its requests fail.
    assert log.pool_cost_usd["b"] == pytest.approx(2 * 7.2 * 600 / 3600)
    failed = log.log.latency_np < 0
    assert log.log.arrival_s[failed].max() < 50.0


def test_outage_loses_in_flight_requests_and_replacements_take_the_provisioning_delay():
    sc = scenario(load={"kind": "constant", "rps": 6.0},
                  events=[{"at_s": 200, "kind": "outage", "pool": "a"}])
    log = _run(sc, Fixed(weights={"a": 1.0}))
    result = summarize(log)
    assert result.dropped_by_reason["replica_lost"] > 0
    failed = log.log.latency_np == RequestLog.NO_REPLICA
    assert 200 <= log.log.arrival_s[failed].min() and log.log.arrival_s[failed].max() < 300
    # Replacements bill from t=200: cost unchanged (5 replicas all along).
    assert log.pool_cost_usd["a"] == pytest.approx(3.0)
    assert 95 <= result.recovery_s[0] <= 110


def test_a_controller_that_reacts_to_losses_steps_right_after_one_and_keeps_its_ticks():
    sc = scenario(events=[{"at_s": 200, "kind": "outage", "pool": "a"},
                          {"at_s": 330, "kind": "interrupt", "pool": "a", "fraction": 0.5}])
    reacting = Fixed(weights={"a": 1.0}, period_s=60, react_to_loss_s=5.0)
    _run(sc, reacting)
    times = [v.now_s for v in reacting.views]
    assert times == [0, 60, 120, 180, 205, 240, 300, 335, 360, 420, 480, 540]
    ticking = Fixed(weights={"a": 1.0}, period_s=60)
    _run(sc, ticking)
    assert [v.now_s for v in ticking.views] == [t for t in times if t % 60 == 0]


def test_capacity_short_keeps_replicas_pending_and_unbilled():
    sc = scenario(events=[{"at_s": 100, "kind": "capacity_short", "pool": "a",
                           "duration_s": 200}])

    class ScaleAt150(Fixed):
        def step(self, view):
            self.views.append(view)
            return Actions(replicas={"a": 8} if view.now_s >= 150 else None,
                           weights={"a": 1.0})

    controller = ScaleAt150(period_s=60)
    log = _run(sc, controller)
    at = {v.now_s: v.pools[0] for v in controller.views}
    # Asked for at the t=180 tick; the view at a tick shows the fleet before it acts.
    assert at[240.0].unschedulable == 3 and at[240.0].unschedulable_since == 180.0
    assert at[240.0].last_ice_s == 240.0  # Karpenter keeps reporting
    assert at[300.0].unschedulable == 0 and at[300.0].starting == 3  # placed when it ends
    # 5 replicas run all along; 3 more are billed from t=300 (the end of the shortage).
    assert log.pool_cost_usd["a"] == pytest.approx(3.0 + 3 * 3.6 * 300 / 3600)


def test_capacity_cap_reclaims_replicas_above_it():
    sc = scenario(events=[{"at_s": 100, "kind": "capacity_short", "pool": "a",
                           "duration_s": 200, "available_replicas": 2}])
    log = _run(sc, Fixed(weights={"a": 1.0}))
    # 3 of 5 replicas gone from 100 to 300 (their replacements wait), then back after 100 s.
    expected = 3.6 / 3600 * (5 * 600 - 3 * (300 - 100))
    assert log.pool_cost_usd["a"] == pytest.approx(expected)


def test_price_change_bills_each_stretch_at_its_price():
    sc = scenario(events=[{"at_s": 300, "kind": "price", "pool": "a", "price_per_hour": 0.36}])
    log = _run(sc, Fixed(weights={"a": 1.0}))
    assert log.pool_cost_usd["a"] == pytest.approx(5 * (3.6 * 300 + 0.36 * 300) / 3600)


def test_interrupt_takes_the_given_fraction():
    sc = scenario(events=[{"at_s": 100, "kind": "interrupt", "pool": "a", "fraction": 0.4}])
    controller = Fixed(weights={"a": 1.0}, period_s=60)
    _run(sc, controller)
    at = {v.now_s: v.pools[0] for v in controller.views}
    assert at[120.0].ready == 3 and at[120.0].starting == 2
    assert at[240.0].ready == 5


def test_scale_down_drains_before_billing_stops():
    sc = scenario(load={"kind": "constant", "rps": 0.5})
    controller = Fixed(replicas={"a": 1}, weights={"a": 1.0})
    log = _run(sc, controller)
    # 4 replicas leave at t=0 (idle: released at once); 1 bills for the whole run.
    assert log.pool_cost_usd["a"] == pytest.approx(3.6 * 600 / 3600, rel=0.01)


def test_arrivals_follow_the_load_curve():
    sc = scenario(duration_s=3600, load={"kind": "cosine", "base_rps": 2, "peak_rps": 20,
                                         "period_s": 3600})
    times = arrivals(sc, np.random.default_rng(0))
    expected = rate_at(sc, np.arange(0.5, 3600)).sum()
    assert len(times) == pytest.approx(expected, rel=0.02)
    assert np.all(np.diff(times) >= 0)
    first_half = (times < 900).sum()
    assert first_half < len(times) / 4  # the trough is at the start


def test_a_run_is_deterministic_per_seed():
    sc = scenario(duration_s=1200, load={"kind": "cosine", "base_rps": 2, "peak_rps": 12,
                                         "period_s": 1200},
                  events=[{"at_s": 400, "kind": "interrupt", "pool": "a", "fraction": 0.5}])
    policies = ["ours", "paper", "hpa", "static-mixed", "static-cheapest"]
    first = run(sc, policies)
    second = run(sc, policies)
    for doc in (first, second):
        doc.pop("wall_s")
        for result in doc["policies"].values():
            result.pop("wall_s")
    assert first == second
    other = run(sc, ["ours"], seed=99)
    assert other["requests"] != first["requests"]


def test_draws_are_shared_by_every_policy():
    sc = scenario()
    draws = draw(sc)
    assert isinstance(draws, Draws)
    assert len(draws.route_u) == len(draws.arrival_s) == len(draws.service_z)
    assert math.isclose(len(draws.arrival_s), 4.0 * 600, rel_tol=0.1)
