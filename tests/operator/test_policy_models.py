"""The arithmetic under the policy: demand estimates and the queueing-based sizing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepfleet.operator.policy.costmodel import (
    late_probability,
    max_utilization,
    price_per_image,
    replicas_for,
    servable_rps,
)
from stepfleet.operator.policy.demand import estimate_demand, fit_trend, planning_rate

INF2 = dict(throughput_rps=1.75, latency_s=0.67, slo_latency_s=3.0, allowed_late=0.01,
            service_cv=0.1, cap=0.97)


def test_fit_trend_recovers_a_line():
    samples = [(t, 5.0 + 0.02 * t) for t in (30, 90, 150, 210)]
    level, slope = fit_trend(samples)
    assert math.isclose(slope, 0.02) and math.isclose(level, 5.0 + 0.02 * 210)
    assert fit_trend([]) == (0.0, 0.0)
    assert fit_trend([(10.0, 3.0)]) == (3.0, 0.0)


def test_estimate_demand_smooths_poisson_noise():
    rng = np.random.default_rng(1)
    samples = [(60.0 * k + 30, rng.poisson(100 * 60) / 60) for k in range(15)]
    estimate = estimate_demand(samples, 60.0, now_s=900.0)
    assert abs(estimate.rate_rps - 100.0) < 1.5
    assert abs(estimate.trend_rps_per_s) < 0.01


def test_estimate_demand_restarts_after_a_step():
    samples = [(60.0 * k + 30, 50.0) for k in range(10)] + [(630.0, 120.0)]
    estimate = estimate_demand(samples, 60.0, now_s=660.0)
    assert estimate.basis == "step" and estimate.rate_rps == 120.0
    assert estimate.trend_rps_per_s == 0.0 and estimate.samples == ((630.0, 120.0),)


def test_estimate_demand_follows_a_steepening_ramp():
    # rate = 100 + 0.0005 t^2: the last four samples are much steeper than the long line.
    samples = [(t, 100 + 0.0005 * t * t) for t in np.arange(30.0, 900.0, 60.0)]
    estimate = estimate_demand(samples, 60.0, now_s=900.0)
    assert estimate.basis in {"ramp", "rise"}
    assert estimate.trend_rps_per_s > fit_trend(samples)[1]


def test_planning_rate_rises_with_the_trend_only():
    assert math.isclose(planning_rate(100, 0.01, 600, 0.05), (100 + 6) * 1.05)
    assert math.isclose(planning_rate(100, -0.01, 600, 0.0), 100)
    assert planning_rate(0, 0, 600, 0.1) == 0


def test_price_per_image():
    assert math.isclose(price_per_image(0.7582, 1.75), 0.7582 / 3600 / 1.75)
    assert price_per_image(1.0, 0.0) == math.inf


def test_bigger_pools_may_run_hotter():
    rhos = [max_utilization(n, **INF2) for n in (1, 2, 4, 8, 32, 128)]
    assert rhos == sorted(rhos)
    assert rhos[0] < 0.6 and rhos[-1] == pytest.approx(0.97)


def test_a_pool_too_slow_for_the_slo_serves_nothing():
    slow = dict(INF2, latency_s=2.9)
    assert max_utilization(10, **slow) == 0.0
    assert replicas_for(10.0, **slow) == 0
    assert late_probability(0.5, 4, 0.5, 0.0, 0.1) == 1.0


@pytest.mark.parametrize("rate", [0.5, 3.0, 17.0, 120.0, 900.0])
def test_replicas_for_is_the_least_that_serves(rate):
    n = replicas_for(rate, **INF2)
    assert servable_rps(n, **INF2) >= rate - 1e-9
    assert servable_rps(n - 1, **INF2) < rate
