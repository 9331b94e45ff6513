"""`stepfleet up`'s pure loop: pools flag, policy spec, observation, decide, router config."""

from __future__ import annotations

import pytest

from stepfleet.operator.local import fleet
from stepfleet.operator.local.supervise import WorkerView
from stepfleet.operator.loop.observe import WorkerSample
from stepfleet.serving.router.config import parse_config

POOLS = (fleet.LocalPool("cheap", 0.10), fleet.LocalPool("fast", 0.40))


def ready(name: str, pool: str, port: int) -> WorkerView:
    return WorkerView(name=name, pool=pool, phase="ready", started_s=0.0, url=f"http://127.0.0.1:{port}")


def sample(requests: float, queue: float = 0.0) -> WorkerSample:
    return WorkerSample(requests_total=requests, latency_buckets=((1.0, requests), (float("inf"), requests)),
                        queue_depth=queue)


class TestPoolsFlag:
    def test_names_and_prices(self):
        assert fleet.parse_pools("cheap:0.10, fast:0.4") == POOLS
        assert fleet.parse_pools("cpu") == (fleet.LocalPool("cpu", 0.0),)

    @pytest.mark.parametrize("text, message", [
        ("", "no pools"), ("a:x", "not a number"), ("a:-1", "non-negative"), ("a:1,a:2", "twice"),
        ("bad name:1", "name"), ("a:nan", "non-negative"),
    ])
    def test_bad_flags_say_what_is_wrong(self, text, message):
        with pytest.raises(ValueError, match=message):
            fleet.parse_pools(text)


def test_policy_spec_carries_prices_limits_and_second_scale_delays():
    settings = fleet.LocalSettings(interval_s=2.0, min_workers=1, max_workers=3, provision_s=20.0)
    spec = fleet.local_policy_spec(POOLS, settings)
    assert [(p.name, p.price_per_hour, p.min_replicas, p.max_replicas) for p in spec.pools] == [
        ("cheap", 0.10, 1, 3), ("fast", 0.40, 1, 3)]
    assert spec.control.interval_s == 2.0 and spec.control.dwell_s < 600 and spec.control.stabilization_s <= 60
    assert fleet.initial_desired(POOLS, fleet.LocalSettings(min_workers=0)) == {"cheap": 1, "fast": 1}


def test_shortage_is_a_worker_unready_past_the_grace():
    workers = [
        WorkerView("cheap-1", "cheap", "starting", started_s=0.0, unready_since_s=0.0),
        WorkerView("cheap-2", "cheap", "crashed", started_s=50.0, unready_since_s=40.0),
        WorkerView("fast-1", "fast", "starting", started_s=90.0, unready_since_s=90.0),
        WorkerView("fast-2", "fast", "ready", started_s=0.0),
    ]
    assert fleet.shortages(workers, now_s=100.0, grace_s=30.0) == {"cheap": 0.0}
    assert fleet.shortages(workers, now_s=100.0, grace_s=200.0) == {}


class TestControlStep:
    def spec(self, **kw):
        return fleet.local_policy_spec(POOLS, fleet.LocalSettings(interval_s=5.0, max_workers=4, **kw))

    def test_first_scrape_gives_no_plan_then_the_operator_policy_decides(self):
        memory = fleet.LoopMemory()
        workers = [ready("cheap-1", "cheap", 9001), ready("fast-1", "fast", 9002)]
        desired = {"cheap": 1, "fast": 1}
        spec = self.spec()
        assert fleet.control_step(memory, spec, POOLS, desired, workers,
                                  {"cheap-1": sample(0), "fast-1": sample(0)}, 100.0, 120.0) is None
        plan = fleet.control_step(memory, spec, POOLS, desired, workers,
                                  {"cheap-1": sample(0), "fast-1": sample(0)}, 105.0, 120.0)
        assert plan is not None and plan.mode == "cost"
        assert plan.replicas == {"cheap": 1, "fast": 1}  # the minimum, with no demand
        assert memory.plan is plan and memory.samples

    def test_demand_above_one_worker_scales_the_cheap_pool_first(self):
        memory = fleet.LoopMemory()
        workers = [ready("cheap-1", "cheap", 9001), ready("fast-1", "fast", 9002)]
        desired = {"cheap": 1, "fast": 1}
        spec = self.spec()
        fleet.control_step(memory, spec, POOLS, desired, workers, {"cheap-1": sample(0), "fast-1": sample(0)},
                           100.0, 120.0)
        # 15 requests in 5 s = 3 rps, against 1 rps per worker.
        plan = fleet.control_step(memory, spec, POOLS, desired, workers,
                                  {"cheap-1": sample(15), "fast-1": sample(0)}, 105.0, 120.0)
        assert plan.replicas["cheap"] == 4 and plan.replicas["cheap"] >= plan.replicas["fast"]
        assert any("cheapest" in r for r in plan.reasons)

    def test_a_pool_whose_worker_never_gets_ready_goes_capacity_short(self):
        memory = fleet.LoopMemory()
        workers = [ready("cheap-1", "cheap", 9001),
                   WorkerView("fast-1", "fast", "crashed", started_s=0.0, unready_since_s=0.0, restarts=5)]
        desired = {"cheap": 1, "fast": 1}
        spec = fleet.local_policy_spec(POOLS, fleet.LocalSettings(interval_s=5.0, mode="auto"))
        fleet.control_step(memory, spec, POOLS, desired, workers, {"cheap-1": sample(0)}, 100.0, 30.0)
        fleet.control_step(memory, spec, POOLS, desired, workers, {"cheap-1": sample(0)}, 105.0, 30.0)
        assert memory.state.memory("fast").short_since == 0.0


class TestRouterConfig:
    def test_ready_workers_and_weights_make_a_config_the_router_accepts(self):
        workers = [ready("cheap-1", "cheap", 9001), ready("cheap-2", "cheap", 9003), ready("fast-1", "fast", 9002),
                   WorkerView("fast-2", "fast", "starting", started_s=0.0, url="http://127.0.0.1:9004")]
        text = fleet.render_router_config(fleet.router_config(POOLS, workers, {"cheap": 0.75, "fast": 0.25}, "tiny-sd"))
        config = parse_config(text)
        assert config.model == "tiny-sd"
        assert config.weights() == {"cheap": 0.75, "fast": 0.25}
        assert config.pools[0].endpoints == ("http://127.0.0.1:9001", "http://127.0.0.1:9003")
        assert config.pools[1].endpoints == ("http://127.0.0.1:9002",)  # not the starting one
        assert config.pools[1].price_per_hour == 0.40

    def test_pools_without_a_ready_worker_are_left_out_and_no_plan_means_equal_weights(self):
        workers = [ready("fast-1", "fast", 9002), WorkerView("cheap-1", "cheap", "stopping", 0.0, url="http://x:1")]
        config = parse_config(fleet.render_router_config(fleet.router_config(POOLS, workers, None)))
        assert config.weights() == {"fast": 1.0}
        assert parse_config(fleet.render_router_config(fleet.router_config(POOLS, [], None))).pools == ()
