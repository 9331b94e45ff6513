"""`ours`: the simulated fleet driven by the operator's own `decide`.

This adapter plays the operator's observe and act: it turns the fleet view into an
`Observation` (rates over the last interval, the trend over the last five, Karpenter's
insufficient-capacity reports as `capacity_short_since`), calls the pure policy, and turns
the plan into replicas and weights. The policy code is the one the kopf timer will run.
"""

from __future__ import annotations

from collections import deque

from stepfleet.operator.policy import (
    ControlSettings,
    Observation,
    PolicySpec,
    PolicyState,
    PoolObservation,
    PoolSpec,
    SloSpec,
    decide,
)
from stepfleet.operator.policy.demand import estimate_demand

from .controller import Actions
from .scenario import Scenario
from .view import FleetView

#: Interval rates the trend is fitted over (a quarter hour at the default interval).
TREND_SAMPLES = 15


def policy_spec(scenario: Scenario) -> PolicySpec:
    """The DiffusionService spec the operator would hold for this scenario."""
    overrides = {k: v for k, v in scenario.control.model_dump().items() if v is not None}
    return PolicySpec(
        slo=SloSpec(latency_s=scenario.slo.latency_s, percentile=scenario.slo.percentile),
        pools=tuple(
            PoolSpec(name=p.name, price_per_hour=p.price_per_hour,
                     throughput_rps_per_replica=p.throughput_rps_per_replica,
                     latency_s=p.latency_s, provision_s=p.provision_s,
                     min_replicas=p.min_replicas, max_replicas=p.max_replicas,
                     service_cv=p.service_cv)
            for p in scenario.pools),
        control=ControlSettings(interval_s=scenario.control_interval_s, **overrides),
    )


class Ours:
    name = "ours"

    def __init__(self, scenario: Scenario) -> None:
        self.spec = policy_spec(scenario)
        self.period_s = scenario.control_interval_s
        self.state = PolicyState()
        self.samples: deque[tuple[float, float]] = deque(maxlen=TREND_SAMPLES)
        self.percentile = scenario.slo.percentile

    def observe(self, view: FleetView) -> Observation:
        now = view.now_s
        rate, trend = view.arrival_rate(self.period_s), 0.0
        if now >= self.period_s:  # a full window: a sample, stamped at its middle
            self.samples.append((now - self.period_s / 2.0, rate))
            estimate = estimate_demand(list(self.samples), self.period_s, now)
            rate, trend = estimate.rate_rps, estimate.trend_rps_per_s
            self.samples = deque(estimate.samples, maxlen=TREND_SAMPLES)
        pools = []
        for index, counts in enumerate(view.pools):
            pools.append(PoolObservation(
                name=counts.name,
                desired_replicas=counts.desired,
                ready_replicas=counts.ready,
                pending_replicas=counts.starting + counts.unschedulable,
                price_per_hour=counts.price_per_hour,
                latency_s=view.latency_percentile(index, self.period_s, self.percentile),
                queue_depth=view.queue_depth(index),
                capacity_short_since=counts.unschedulable_since,
            ))
        return Observation(now_s=now, arrival_rps=rate, arrival_trend_rps_per_s=trend,
                           pools=tuple(pools))

    def step(self, view: FleetView) -> Actions:
        plan, self.state = decide(self.observe(view), self.state, self.spec)
        return Actions(replicas=plan.replicas, weights=plan.weights, mode=plan.mode,
                       reasons=plan.reasons)
