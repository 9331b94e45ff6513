"""A lower bound on what serving a scenario's load can cost: the offline optimum.

It knows the future and pays for nothing it does not use: at every second it holds exactly
the fractional replicas that carry the offered rate at full throughput, minimum replicas
first (they are paid for anyway, so their capacity is used), then the pool cheapest per
image at that second's prices that meets the SLO, then the next. No provisioning delay, no
headroom, no whole replicas, no queueing. Outages and interruptions cost it nothing (it
replaces capacity instantly); capacity shortages are ignored, which keeps it a valid bound
(any real fleet could have bought that capacity beforehand) though a looser one there.

Every policy that serves the offered load pays at least this much (up to Poisson noise in
the arrivals), so cost / bound says how close a policy gets to the cheapest possible fleet.
"""

from __future__ import annotations

import numpy as np

from stepfleet.operator.policy.costmodel import price_per_image

from .load import rate_grid
from .scenario import PriceChange, Scenario


def cost_lower_bound(scenario: Scenario, step_s: float = 1.0) -> float:
    starts, rates = rate_grid(scenario, step_s)
    widths = np.minimum(step_s, scenario.duration_s - starts)
    prices = np.array([[p.price_per_hour for p in scenario.pools]] * len(starts))
    for event in sorted((e for e in scenario.events if isinstance(e, PriceChange)),
                        key=lambda e: e.at_s):
        prices[starts >= event.at_s, scenario.pool_index(event.pool)] = event.price_per_hour
    total = 0.0
    # Prices change only at events, so solve each stretch of constant prices at once.
    _, first_rows = np.unique(prices, axis=0, return_index=True)
    for row in sorted(first_rows):
        same = np.all(prices == prices[row], axis=1)
        total += _stretch_cost(scenario, prices[row], rates[same], widths[same])
    return total


def _stretch_cost(scenario: Scenario, prices: np.ndarray, rates: np.ndarray,
                  widths: np.ndarray) -> float:
    pools = scenario.pools
    base_cost = sum(p.min_replicas * prices[i] for i, p in enumerate(pools))  # $/h
    base_capacity = sum(p.min_replicas * p.throughput_rps_per_replica for p in pools
                        if p.latency_s < scenario.slo.latency_s)
    order = sorted((i for i, p in enumerate(pools) if p.latency_s < scenario.slo.latency_s),
                   key=lambda i: price_per_image(prices[i], pools[i].throughput_rps_per_replica))
    # Piecewise-linear cost ($/h) of the rate served above the minima.
    capacity_points, cost_points = [0.0], [0.0]
    for i in order:
        pool = pools[i]
        extra = (pool.max_replicas - pool.min_replicas) * pool.throughput_rps_per_replica
        if extra <= 0:
            continue
        capacity_points.append(capacity_points[-1] + extra)
        cost_points.append(cost_points[-1] + extra / pool.throughput_rps_per_replica * prices[i])
    above = np.clip(rates - base_capacity, 0.0, capacity_points[-1])
    hourly = base_cost + np.interp(above, capacity_points, cost_points)
    return float(np.sum(hourly * widths) / 3600.0)
