"""The control loop's Prometheus metrics: mode, cost, desired replicas and capacity per pool.

Set by `timer.run_once` after each decision (from the plan it is about to write, not from
what a later reconcile reads back), served by `stepfleet operator` on its metrics port
(`--metrics`, the chart's port named `metrics`), and read by the fleet-overview dashboard
and the `StepfleetPoolCapacityShort` alert (`stepfleet dashboards` checks the names).

Every series carries the DiffusionService's `namespace` and name (`diffusionservice`);
the per-pool ones add `pool`. The ServiceMonitor keeps these labels (`honorLabels`), so
`namespace` is the object's namespace, not the operator's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

MODE = "stepfleet_operator_mode"
COST = "stepfleet_operator_cost_dollars_per_hour"
POOL_REPLICAS = "stepfleet_operator_pool_replicas"
POOL_CAPACITY_SHORT = "stepfleet_operator_pool_capacity_short"

#: Every mode the policy knows; each gets a series (1 for the current one, 0 otherwise), so a
#: state timeline and `== 1` queries see the switch rather than a series appearing.
MODES = ("cost", "capacity")

_SERVICE = ["namespace", "diffusionservice"]
_POOL = [*_SERVICE, "pool"]


class LoopMetrics:
    """The control loop's gauges on `registry` (the process-wide default when served)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.mode = Gauge(MODE, "1 for the control loop's current mode of a DiffusionService, 0 for the others.",
                          [*_SERVICE, "mode"], registry=registry)
        self.cost = Gauge(COST, "Planned cost per hour: sum over pools of desired replicas x price per hour.",
                          _SERVICE, registry=registry)
        self.replicas = Gauge(POOL_REPLICAS, "Replicas the control loop wants for a pool.", _POOL, registry=registry)
        self.capacity_short = Gauge(POOL_CAPACITY_SHORT, "1 while the control loop holds a pool short of capacity.",
                                    _POOL, registry=registry)
        self._pools: dict[tuple[str, str], set[str]] = {}

    def record(
        self,
        namespace: str,
        name: str,
        *,
        mode: str,
        cost_per_hour: float,
        replicas: Mapping[str, int],
        short: Iterable[str],
    ) -> None:
        """One decision: the plan's mode, cost and replicas, and the pools held short."""
        for m in sorted({*MODES, mode}):
            self.mode.labels(namespace, name, m).set(1.0 if m == mode else 0.0)
        self.cost.labels(namespace, name).set(cost_per_hour)
        short = set(short)
        pools = set(replicas)
        for gone in self._pools.get((namespace, name), set()) - pools:  # a pool removed from the spec
            self._remove_pool(namespace, name, gone)
        for pool, n in replicas.items():
            self.replicas.labels(namespace, name, pool).set(n)
            self.capacity_short.labels(namespace, name, pool).set(1.0 if pool in short else 0.0)
        self._pools[(namespace, name)] = pools

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted DiffusionService's series (no stale 'No data' lines on dashboards)."""
        for m in {*MODES, *self._modes(namespace, name)}:
            _remove(self.mode, namespace, name, m)
        _remove(self.cost, namespace, name)
        for pool in self._pools.pop((namespace, name), set()):
            self._remove_pool(namespace, name, pool)

    def _modes(self, namespace: str, name: str) -> set[str]:
        return {s.labels["mode"] for fam in self.mode.collect() for s in fam.samples
                if s.labels.get("namespace") == namespace and s.labels.get("diffusionservice") == name}

    def _remove_pool(self, namespace: str, name: str, pool: str) -> None:
        _remove(self.replicas, namespace, name, pool)
        _remove(self.capacity_short, namespace, name, pool)


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
