"""Kubernetes' Horizontal Pod Autoscaler, as the `hpa` and `paper` baselines use it.

Follows the controller's algorithm with its default behaviour (autoscaling/v2): every 15 s,
for an external metric with an AverageValue target (how KEDA exposes a request-count
trigger), the proposal is ceil(metric total / target per pod), unless the ratio to the
current replicas is within the 10 % tolerance; scale-up is not stabilized and may at most
double or add 4 pods per 15 s, whichever is more; scale-down takes the highest proposal of
the last 300 s and may remove everything above the minimum at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HpaBehavior:
    sync_period_s: float = 15.0
    tolerance: float = 0.1
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4
    scale_down_percent: float = 100.0


@dataclass
class Hpa:
    min_replicas: int
    max_replicas: int
    target_per_pod: float
    behavior: HpaBehavior = field(default_factory=HpaBehavior)
    recommendations: list[tuple[float, int]] = field(default_factory=list)

    def desired(self, now_s: float, current: int, metric_total: float) -> int:
        """Replicas the HPA sets, given the current count and the metric's total value."""
        if current <= 0:
            return max(self.min_replicas, 0)  # scaled to zero: the HPA is inactive
        proposal = self._proposal(current, metric_total)
        self.recommendations.append((now_s, proposal))
        horizon = max(self.behavior.scale_up_stabilization_s,
                      self.behavior.scale_down_stabilization_s)
        self.recommendations = [(t, n) for t, n in self.recommendations if t > now_s - horizon]
        up = min(n for t, n in self.recommendations
                 if t > now_s - self.behavior.scale_up_stabilization_s or t == now_s)
        down = max(n for t, n in self.recommendations
                   if t > now_s - self.behavior.scale_down_stabilization_s)
        stabilized = current
        if stabilized < up:
            stabilized = up
        if stabilized > down:
            stabilized = down
        return self._limit(current, stabilized)

    def _proposal(self, current: int, metric_total: float) -> int:
        if self.target_per_pod <= 0:
            return current
        ratio = metric_total / (self.target_per_pod * current)
        if abs(ratio - 1.0) <= self.behavior.tolerance:
            return current
        return math.ceil(metric_total / self.target_per_pod - 1e-9)

    def _limit(self, current: int, wanted: int) -> int:
        b = self.behavior
        up_limit = max(math.ceil(current * (1 + b.scale_up_percent / 100.0)),
                       current + b.scale_up_pods)
        down_limit = math.floor(current * (1 - b.scale_down_percent / 100.0))
        wanted = min(wanted, up_limit)
        wanted = max(wanted, down_limit)
        return max(self.min_replicas, min(self.max_replicas, wanted))
