"""Metrics: windowed attainment, recovery after events, and the cost lower bound."""

from __future__ import annotations

import numpy as np
import pytest
from sim_fixtures import POOL_A, POOL_B, scenario

from stepfleet.operator.simulator.bound import cost_lower_bound
from stepfleet.operator.simulator.metrics import recovery_times, window_attainment


def _stream(duration: int, bad: tuple[int, int] | None = None, per_second: int = 10):
    arrival = np.repeat(np.arange(duration, dtype=float), per_second) + 0.5
    good = np.ones_like(arrival, dtype=bool)
    if bad is not None:
        good[(arrival >= bad[0]) & (arrival < bad[1])] = False
    return arrival, good


def test_window_attainment_counts_each_minute_from_each_second():
    arrival, good = _stream(300, bad=(100, 130))
    attainment, count = window_attainment(arrival, good, 300)
    assert count[0] == 600 and attainment[0] == 1.0
    assert attainment[100] == pytest.approx(0.5)
    assert attainment[130] == 1.0


def test_recovery_is_when_minute_attainment_is_back_for_good():
    arrival, good = _stream(1000, bad=(200, 320))
    # Windows starting up to 319 hold a miss; at 0.95 the last short one starts at 316.
    assert recovery_times(arrival, good, [200.0], 1000, 0.95) == [117.0]
    assert recovery_times(arrival, good, [500.0], 1000, 0.95) == [0.0]
    assert recovery_times(arrival, good, [], 1000, 0.95) == []


def test_recovery_stops_at_the_next_event():
    arrival, good = _stream(2000, bad=(100, 160))
    late = good.copy()
    late[(arrival >= 900) & (arrival < 960)] = False
    times = recovery_times(arrival, late, [100.0, 880.0], 2000, 0.95)
    assert times[0] == pytest.approx(57.0)
    assert times[1] == pytest.approx(77.0)


def test_lower_bound_of_one_pool_is_its_price_per_image_times_the_images():
    sc = scenario(pools=[dict(POOL_A, min_replicas=0)], load={"kind": "constant", "rps": 4.0})
    # 4 rps on 2-rps replicas at $3.60/h: 2 replicas for 600 s.
    assert cost_lower_bound(sc) == pytest.approx(2 * 3.6 * 600 / 3600)


def test_lower_bound_counts_minimums_first_then_cheapest_per_image():
    sc = scenario(pools=[dict(POOL_A, min_replicas=0), dict(POOL_B, min_replicas=1)],
                  load={"kind": "constant", "rps": 6.0})
    # b's one replica (paid anyway) serves 2 rps; a serves the other 4.
    expected = (7.2 + 2 * 3.6) * 600 / 3600
    assert cost_lower_bound(sc) == pytest.approx(expected)


def test_lower_bound_follows_price_changes():
    sc = scenario(pools=[dict(POOL_A, min_replicas=0), dict(POOL_B, min_replicas=0)],
                  load={"kind": "constant", "rps": 2.0},
                  events=[{"at_s": 300, "kind": "price", "pool": "b", "price_per_hour": 1.8}])
    expected = (3.6 * 300 + 1.8 * 300) / 3600
    assert cost_lower_bound(sc) == pytest.approx(expected)
