"""The baselines `ours` is measured against, each as its description says and no smarter.

- `static-cheapest`: everything on the pool cheapest per image, sized once for the
  scenario's peak; no autoscaling, no reaction to anything.
- `static-mixed`: fixed router weights like the paper's cost mode (inf2 40, trn1 20, A10G
  30, L4 10 in the built-in scenarios), every pool sized once for its share of the peak.
- `hpa`: the same fixed weights, each pool autoscaled by a Kubernetes HPA on its request
  rate with a target of 80 % of its throughput per replica, default HPA behaviour.
- `paper`: the loop of Biran & Kissos (arXiv 2503.20074) and its repository. Cost mode uses
  the fixed weights and KEDA-driven HPAs whose target is each pool's breaking-point
  throughput (their `targetMetricValue`). Every 300 s it reads Karpenter's log; on any
  insufficient-capacity error it flips to its capacity-optimized configuration — one
  Service round-robin over every ready pod (an equal spread per pod), HPA targets set to
  the "adjusted throughput" min(mean of max throughputs, own max) — and stays there for the
  rest of the load cycle, falling back to cost mode at the load trough (a local minimum of
  the 300 s throughput in the lowest quarter of the day's range).

Sizing for static pools and the `hpa` target use 80 % utilization, a common HPA target.
The HPA metric is the pool's request rate over the last 60 s (what an ALB request-count
metric gives), fresher than CloudWatch would deliver: a favour to the baselines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from stepfleet.operator.policy.costmodel import price_per_image

from .controller import Actions
from .hpa import Hpa
from .load import peak_rate
from .scenario import Pool, Scenario
from .view import FleetView

#: Utilization the static baselines are sized for and the `hpa` baseline targets.
BASELINE_UTILIZATION = 0.8
#: Trailing window of the request-rate metric the HPAs read.
METRIC_WINDOW_S = 60.0
HPA_PERIOD_S = 15.0
PAPER_POLL_S = 300.0


def meets_slo(pool: Pool, scenario: Scenario) -> bool:
    return pool.latency_s < scenario.slo.latency_s


def fixed_weights(scenario: Scenario) -> dict[str, float]:
    """The scenario's fixed weights (`weight:` per pool), else inverse price per image."""
    if any(p.weight is not None for p in scenario.pools):
        raw = {p.name: p.weight or 0.0 for p in scenario.pools}
    else:
        raw = {p.name: 1.0 / price_per_image(p.price_per_hour, p.throughput_rps_per_replica)
               if meets_slo(p, scenario) and p.price_per_hour > 0 else 0.0
               for p in scenario.pools}
    total = sum(raw.values()) or 1.0
    return {name: value / total for name, value in raw.items()}


def cheapest_pool(scenario: Scenario) -> Pool:
    eligible = [p for p in scenario.pools if meets_slo(p, scenario)] or list(scenario.pools)
    return min(eligible, key=lambda p: (price_per_image(p.price_per_hour,
                                                        p.throughput_rps_per_replica), p.name))


def _sized(rate: float, pool: Pool) -> int:
    return math.ceil(rate / (pool.throughput_rps_per_replica * BASELINE_UTILIZATION) - 1e-9)


class StaticCheapest:
    name = "static-cheapest"
    react_to_loss_s = None  # acts on its ticks only
    period_s = math.inf

    def __init__(self, scenario: Scenario) -> None:
        pool = cheapest_pool(scenario)
        count = min(pool.max_replicas, _sized(peak_rate(scenario), pool))
        self.replicas = {p.name: (count if p.name == pool.name else 0) for p in scenario.pools}
        self.weights = {p.name: (1.0 if p.name == pool.name else 0.0) for p in scenario.pools}

    def step(self, view: FleetView) -> Actions:
        return Actions(replicas=self.replicas, weights=self.weights, mode="static")


class StaticMixed:
    name = "static-mixed"
    react_to_loss_s = None  # acts on its ticks only
    period_s = math.inf

    def __init__(self, scenario: Scenario) -> None:
        peak = peak_rate(scenario)
        self.weights = fixed_weights(scenario)
        self.replicas = {
            p.name: max(p.min_replicas, min(p.max_replicas, _sized(peak * self.weights[p.name], p)))
            for p in scenario.pools}

    def step(self, view: FleetView) -> Actions:
        return Actions(replicas=self.replicas, weights=self.weights, mode="static")


def _hpas(scenario: Scenario, targets: Mapping[str, float]) -> dict[str, Hpa]:
    return {p.name: Hpa(min_replicas=max(1, p.min_replicas), max_replicas=p.max_replicas,
                        target_per_pod=targets[p.name]) for p in scenario.pools}


def _autoscale(hpas: Mapping[str, Hpa], view: FleetView) -> dict[str, int]:
    rates = view.pool_arrival_rates(METRIC_WINDOW_S)
    return {counts.name: hpas[counts.name].desired(view.now_s, counts.desired, rates[i])
            for i, counts in enumerate(view.pools)}


class HpaBaseline:
    name = "hpa"
    react_to_loss_s = None  # acts on its ticks only
    period_s = HPA_PERIOD_S

    def __init__(self, scenario: Scenario) -> None:
        self.weights = fixed_weights(scenario)
        self.hpas = _hpas(scenario, {p.name: p.throughput_rps_per_replica * BASELINE_UTILIZATION
                                     for p in scenario.pools})

    def step(self, view: FleetView) -> Actions:
        if view.now_s <= 0:  # no metric yet: keep what runs
            return Actions(weights=self.weights, mode="static")
        return Actions(replicas=_autoscale(self.hpas, view), weights=self.weights, mode="static")


class PaperLoop:
    name = "paper"
    react_to_loss_s = None  # acts on its ticks only
    period_s = HPA_PERIOD_S

    def __init__(self, scenario: Scenario) -> None:
        self.cost_weights = fixed_weights(scenario)
        self.breaking = {p.name: p.throughput_rps_per_replica for p in scenario.pools}
        mean = sum(self.breaking.values()) / len(self.breaking)
        self.adjusted = {name: min(mean, value) for name, value in self.breaking.items()}
        self.hpas = _hpas(scenario, self.breaking)
        self.mode = "cost"
        self.last_poll_s = 0.0
        self.next_poll_s = PAPER_POLL_S
        self.samples: list[float] = []
        self.samples_per_day = max(3, round(86400.0 / PAPER_POLL_S))

    def _set_targets(self, targets: Mapping[str, float]) -> None:
        for name, hpa in self.hpas.items():
            hpa.target_per_pod = targets[name]

    def _trough(self) -> bool:
        s = self.samples[-self.samples_per_day:]
        if len(s) < 3:
            return False
        lo, hi = min(s), max(s)
        return s[-3] > s[-2] < s[-1] and s[-2] <= lo + 0.25 * (hi - lo)

    def _poll(self, view: FleetView) -> tuple[str, ...]:
        errors = [c.name for c in view.pools if c.last_ice_s >= self.last_poll_s]
        self.samples.append(view.arrival_rate(PAPER_POLL_S))
        self.last_poll_s = view.now_s
        if self.mode == "cost" and errors:
            self.mode = "capacity"
            self._set_targets(self.adjusted)
            return (f"capacity error on {', '.join(errors)}: round-robin over every pod",)
        if self.mode == "capacity" and self._trough():
            self.mode = "cost"
            self._set_targets(self.breaking)
            return ("load trough: back to cost-optimized weights",)
        return ()

    def step(self, view: FleetView) -> Actions:
        reasons: tuple[str, ...] = ()
        if view.now_s >= self.next_poll_s:
            reasons = self._poll(view)
            self.next_poll_s += PAPER_POLL_S
        if self.mode == "cost":
            weights = self.cost_weights
        else:  # one Service over all pods: each ready pod gets an equal share
            weights = {c.name: float(c.ready) for c in view.pools}
        replicas = _autoscale(self.hpas, view) if view.now_s > 0 else None
        return Actions(replicas=replicas, weights=weights, mode=self.mode, reasons=reasons)
