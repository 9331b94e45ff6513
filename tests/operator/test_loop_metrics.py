"""The control loop's gauges: set from each decision, dropped with the object, read by dashboards.

The end-to-end test runs the loop (kopf in-process) against the emulated API server, as
`test_loop_wiring` does, with the gauges on a registry of its own; `test_cli_operator`
checks that `stepfleet operator` serves them over HTTP.
"""

from __future__ import annotations

import dataclasses

import pytest
from emulator import eventually
from operator_harness import NS, delete, emulator, operator
from prometheus_client import CollectorRegistry, generate_latest
from test_loop_wiring import LOOP, _fleet, _replicas, _started, _status, _workers

from stepfleet.operator import dashboards
from stepfleet.operator.loop import metrics
from stepfleet.operator.loop.metrics import LoopMetrics

pytestmark = pytest.mark.timeout(60)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"namespace": NS, "diffusionservice": "tiny", **labels})


def test_record_sets_every_mode_and_pool_and_forget_drops_them():
    registry = CollectorRegistry()
    gauges = LoopMetrics(registry=registry)
    gauges.record("ml", "a", mode="capacity", cost_per_hour=1.5, replicas={"x": 2, "y": 3}, short={"x"})
    get = registry.get_sample_value
    assert get(metrics.MODE, {"namespace": "ml", "diffusionservice": "a", "mode": "capacity"}) == 1.0
    assert get(metrics.MODE, {"namespace": "ml", "diffusionservice": "a", "mode": "cost"}) == 0.0
    assert get(metrics.COST, {"namespace": "ml", "diffusionservice": "a"}) == 1.5
    assert get(metrics.POOL_REPLICAS, {"namespace": "ml", "diffusionservice": "a", "pool": "y"}) == 3.0
    assert get(metrics.POOL_CAPACITY_SHORT, {"namespace": "ml", "diffusionservice": "a", "pool": "x"}) == 1.0
    assert get(metrics.POOL_CAPACITY_SHORT, {"namespace": "ml", "diffusionservice": "a", "pool": "y"}) == 0.0
    # a pool removed from the spec loses its series; another object's series are untouched
    gauges.record("ml", "a", mode="cost", cost_per_hour=0.5, replicas={"x": 1}, short=())
    gauges.record("ml", "b", mode="cost", cost_per_hour=0.1, replicas={"x": 1}, short=())
    assert get(metrics.POOL_REPLICAS, {"namespace": "ml", "diffusionservice": "a", "pool": "y"}) is None
    assert get(metrics.MODE, {"namespace": "ml", "diffusionservice": "a", "mode": "cost"}) == 1.0
    gauges.forget("ml", "a")
    text = generate_latest(registry).decode()
    assert 'diffusionservice="a"' not in text and 'diffusionservice="b"' in text
    gauges.forget("ml", "a")  # twice is harmless


def test_the_dashboards_find_the_loop_gauges():
    exported, missing = dashboards.exported_metrics()
    assert {metrics.MODE, metrics.COST, metrics.POOL_REPLICAS, metrics.POOL_CAPACITY_SHORT} <= exported
    assert not missing and not dashboards.PENDING


async def test_a_loop_run_sets_mode_replicas_and_cost():
    registry = CollectorRegistry()
    config = dataclasses.replace(LOOP, loop_metrics=LoopMetrics(registry=registry))
    async with emulator() as em, operator(em, config):
        await _started(em, _fleet())
        async with _workers(em, {"ondemand": 3.0}):
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)

            def agrees() -> bool:  # the gauges say what the loop wrote (a later tick may change both)
                status = _status(em)
                pools = {p["name"]: p.get("replicas") for p in status.get("pools") or []}
                return (
                    _value(registry, metrics.MODE, mode=status.get("mode", "")) == 1.0
                    and _value(registry, metrics.POOL_REPLICAS, pool="spot") == pools.get("spot") == _replicas(em, "spot")
                    and _value(registry, metrics.POOL_REPLICAS, pool="ondemand") == pools.get("ondemand")
                    and abs((_value(registry, metrics.COST) or -1) - status.get("totalCostPerHour", -2)) < 1e-3
                )

            await eventually(agrees)
            assert _value(registry, metrics.MODE, mode="cost") == 1.0
            assert _value(registry, metrics.MODE, mode="capacity") == 0.0
            assert _value(registry, metrics.COST) == pytest.approx(
                0.357 * _replicas(em, "ondemand") + 0.14 * _replicas(em, "spot"), abs=1e-3)
            assert _value(registry, metrics.POOL_CAPACITY_SHORT, pool="spot") == 0.0
        # deleting the object drops its series (workers gone: no run decides in between)
        await delete(em, "tiny")
        await eventually(lambda: _value(registry, metrics.COST) is None, timeout=15)
