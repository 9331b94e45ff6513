"""Small scenarios for simulator tests: seconds of simulated time, milliseconds to run."""

from __future__ import annotations

from typing import Any

from stepfleet.operator.simulator.controller import Actions
from stepfleet.operator.simulator.scenario import Scenario, parse
from stepfleet.operator.simulator.view import FleetView

POOL_A = {"name": "a", "price_per_hour": 3.6, "throughput_rps_per_replica": 2.0,
          "latency_s": 0.5, "provision_s": 100, "min_replicas": 0, "max_replicas": 50,
          "initial_replicas": 5, "service_cv": 0.0}
POOL_B = {"name": "b", "price_per_hour": 7.2, "throughput_rps_per_replica": 2.0,
          "latency_s": 0.5, "provision_s": 50, "min_replicas": 0, "max_replicas": 50,
          "initial_replicas": 0, "service_cv": 0.0}


def scenario(**overrides: Any) -> Scenario:
    data: dict[str, Any] = {
        "name": "tiny", "seed": 3, "duration_s": 600, "slo": {"latency_s": 2.0},
        "control_interval_s": 60, "timeout_s": 10,
        "pools": [dict(POOL_A), dict(POOL_B)],
        "load": {"kind": "constant", "rps": 4.0},
    }
    data.update(overrides)
    return parse(data)


class Fixed:
    """A controller that sets replicas and weights once (or every period) and logs views."""

    name = "fixed"

    def __init__(self, replicas: dict[str, int] | None = None,
                 weights: dict[str, float] | None = None, period_s: float = float("inf"),
                 react_to_loss_s: float | None = None):
        self.replicas = replicas
        self.weights = weights
        self.period_s = period_s
        self.react_to_loss_s = react_to_loss_s
        self.views: list[FleetView] = []

    def step(self, view: FleetView) -> Actions:
        self.views.append(view)
        return Actions(replicas=self.replicas, weights=self.weights)
