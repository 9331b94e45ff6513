"""`ours`: the simulated fleet driven by the operator's own control step.

This adapter plays the operator's observe and act: it turns the fleet view into `Signals`
(the request rate over the last interval, per-pool replicas, latency and queue, Karpenter's
insufficient-capacity reports as `capacity_short_since`), calls the pure
`policy.control_step` — the one the kopf timer and `stepfleet up` call — and turns the plan
into replicas and weights. Like the operator's scraping path, it decides nothing before a
rate was measured (the tick at t=0 sees no history).
"""

from __future__ import annotations

from stepfleet.operator.policy import (
    ControlSettings,
    PolicySpec,
    PoolObservation,
    PoolSpec,
    Signals,
    SloSpec,
    StepMemory,
    control_step,
)

from .controller import Actions
from .scenario import Scenario
from .view import FleetView


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
                     service_cv=p.service_cv, failure_domain=p.failure_domain or "",
                     capacity_type=p.capacity_type)
            for p in scenario.pools),
        control=ControlSettings(interval_s=scenario.control_interval_s, **overrides),
    )


class Ours:
    name = "ours"
    #: The operator watches its pools' Deployments: a drop in ready replicas runs the control
    #: step at once (after the watch event's delay), not at the next tick.
    react_to_loss_s: float | None = 5.0

    def __init__(self, scenario: Scenario) -> None:
        self.spec = policy_spec(scenario)
        self.period_s = scenario.control_interval_s
        self.memory = StepMemory()
        self.percentile = scenario.slo.percentile

    def signals(self, view: FleetView) -> Signals:
        now = view.now_s
        measured = now >= self.period_s  # a full window behind us
        pools = tuple(
            PoolObservation(
                name=counts.name,
                desired_replicas=counts.desired,
                ready_replicas=counts.ready,
                pending_replicas=counts.starting + counts.unschedulable,
                price_per_hour=counts.price_per_hour,
                latency_s=view.latency_percentile(index, self.period_s, self.percentile),
                queue_depth=view.queue_depth(index),
                capacity_short_since=counts.unschedulable_since,
            )
            for index, counts in enumerate(view.pools))
        return Signals(arrival_rps=view.arrival_rate(self.period_s) if measured else None,
                       window_s=self.period_s, pools=pools)

    def step(self, view: FleetView) -> Actions:
        plan, self.memory = control_step(self.memory, self.signals(view), self.spec, view.now_s)
        if plan is None:
            return Actions(reasons=("no rate measured yet: keeping what runs",))
        return Actions(replicas=plan.replicas, weights=plan.weights, mode=plan.mode,
                       reasons=plan.reasons)
