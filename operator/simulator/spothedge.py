"""`spothedge`: SkyServe's SpotHedge placement (Mao et al., EuroSys 2025), as a baseline.

SpotHedge serves on spot instances across failure domains (zones) and keeps the SLO through
preemptions by three rules, reproduced here over the scenario's failure domains:

- **autoscale on request rate**: the capacity target is the request rate over the last
  minute at a target utilization (SkyServe's `target_qps_per_replica`; here 80 % of each
  pool's throughput, as the other baselines use), up at once, down only after the target
  stayed lower for the downscale delay (SkyServe's default 1,200 s);
- **spread and over-provision**: the target is spread evenly over the `k` cheapest
  domains with `1 / (k - 1)` of it in each (three domains when there are three), so losing
  any one leaves the whole target ready — the paper's N + N_extra spread over zones;
- **dynamic fallback**: domains that were preempted (lost ready replicas) or reported
  insufficient capacity within the last 30 minutes are avoided, and while spot replicas
  are not ready, on-demand pools carry what they cannot (SkyServe's
  `dynamic_ondemand_fallback`).

Weights follow the ready replicas' throughput. Built-in scenarios have no spot pools: each
pool is then its own domain, and SpotHedge spreads over the cheapest pools the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from stepfleet.operator.policy.costmodel import price_per_image

from .baselines import BASELINE_UTILIZATION, METRIC_WINDOW_S, meets_slo
from .controller import Actions
from .scenario import Pool, Scenario
from .view import FleetView

#: SkyServe's default downscale delay.
DOWNSCALE_DELAY_S = 1200.0
#: How long a preempted or capacity-short domain is avoided.
AVOID_S = 1800.0
#: Domains the target is spread over (losing one leaves (k - 1) / k ... of k x 1/(k-1)).
SPREAD_DOMAINS = 3
#: A domain whose ready replicas fall by this fraction between two ticks was preempted.
PREEMPTED_FRACTION = 0.25


class SpotHedge:
    name = "spothedge"
    #: SkyServe's controller replaces preempted replicas as soon as it sees them gone; it gets
    #: the same early run after a loss as `ours` (the comparison stays like for like).
    react_to_loss_s: float | None = 5.0

    def __init__(self, scenario: Scenario) -> None:
        self.period_s = scenario.control_interval_s
        self.pools = {p.name: p for p in scenario.pools}
        self.eligible = [p for p in scenario.pools if meets_slo(p, scenario)] or list(scenario.pools)
        self.domain = {p.name: p.failure_domain or p.name for p in scenario.pools}
        self.targets: list[tuple[float, float]] = []
        self.last_ready: dict[str, int] = {}
        self.asked: dict[str, int] = {}
        self.avoid_until: dict[str, float] = {}

    def _price(self, pool: Pool, view: FleetView) -> float:
        counts = next(c for c in view.pools if c.name == pool.name)
        return price_per_image(counts.price_per_hour, pool.throughput_rps_per_replica)

    def _preempted(self, view: FleetView) -> list[str]:
        hit = []
        for counts in view.pools:
            # What was ready and still asked for: a scale-down of our own is no preemption.
            before = min(self.last_ready.get(counts.name, 0), self.asked.get(counts.name, 0))
            lost = before - counts.ready
            if (before > 0 and lost >= max(1, math.ceil(PREEMPTED_FRACTION * before))) \
                    or counts.last_ice_s > view.now_s - self.period_s:
                self.avoid_until[self.domain[counts.name]] = view.now_s + AVOID_S
                hit.append(counts.name)
            self.last_ready[counts.name] = counts.ready
        return hit

    def step(self, view: FleetView) -> Actions:
        now = view.now_s
        reasons = [f"avoiding {name}'s domain for {AVOID_S:.0f}s" for name in self._preempted(view)]
        if now <= 0:
            return Actions(mode="spothedge", reasons=tuple(reasons))
        rate = view.arrival_rate(METRIC_WINDOW_S)
        self.targets = [(t, c) for t, c in self.targets if t > now - DOWNSCALE_DELAY_S]
        self.targets.append((now, rate / BASELINE_UTILIZATION))
        target = max(c for _, c in self.targets)

        by_domain: dict[str, list[Pool]] = {}
        for pool in self.eligible:
            by_domain.setdefault(self.domain[pool.name], []).append(pool)
        usable = [d for d in by_domain if self.avoid_until.get(d, -math.inf) <= now] or list(by_domain)
        def price(pool: Pool) -> float:
            return self._price(pool, view)

        usable.sort(key=lambda d: min(price(p) for p in by_domain[d]))
        spot = [d for d in usable if any(p.capacity_type == "spot" for p in by_domain[d])]
        chosen = (spot or usable)[:SPREAD_DOMAINS]
        share = target / max(1, len(chosen) - 1) if len(chosen) > 1 else target
        replicas = {p.name: p.min_replicas for p in self.pools.values()}
        for d in chosen:
            _place(by_domain[d], share, replicas, price)
        # Dynamic fallback: what chosen spot pools cannot serve yet goes on on-demand pools.
        ready_capacity = sum(min(c.ready, replicas[c.name]) * self.pools[c.name].throughput_rps_per_replica
                             for c in view.pools if self.domain[c.name] in chosen)
        missing = target - ready_capacity
        if spot and missing > 0:
            fallback = [d for d in usable if d not in spot]
            for d in fallback[:1]:
                _place(by_domain[d], missing, replicas, price)
        self.asked = dict(replicas)
        weights = {c.name: c.ready * self.pools[c.name].throughput_rps_per_replica for c in view.pools}
        reasons.append(f"target {target:.1f} rps over {', '.join(chosen)} ({share:.1f} rps each)")
        return Actions(replicas=replicas, weights=weights, mode="spothedge", reasons=tuple(reasons))


def _place(pools: list[Pool], rps: float, replicas: dict[str, int],
           price: Callable[[Pool], float]) -> None:
    """Raise a domain's pools, cheapest per image first, until they hold `rps` at full throughput."""
    left = rps - sum(replicas[p.name] * p.throughput_rps_per_replica for p in pools)
    for pool in sorted(pools, key=lambda p: (price(p), p.name)):
        if left <= 1e-9:
            return
        room = pool.max_replicas - replicas[pool.name]
        add = min(room, math.ceil(left / pool.throughput_rps_per_replica - 1e-9))
        if add > 0:
            replicas[pool.name] += add
            left -= add * pool.throughput_rps_per_replica
