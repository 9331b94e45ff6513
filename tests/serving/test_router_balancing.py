"""The router's pure decisions: weighted pool split, within-pool choice, affinity, failover order, cost."""

import io
from collections import Counter

import pytest
from PIL import Image

from stepfleet.serving.router import costing
from stepfleet.serving.router.balancing import (
    Attempts,
    Balancer,
    EndpointLoad,
    PoolView,
    SmoothWeightedRoundRobin,
    choose_endpoint,
    effective_weights,
    rendezvous_rank,
    saturation_retry_after,
)

GEN = costing.RequestCost("generation", 40.0, 40.0)


@pytest.mark.parametrize("weights", [{"a": 0.75, "b": 0.25}, {"a": 0.5, "b": 0.3, "c": 0.2},
                                     {"a": 0.123, "b": 0.456, "c": 0.421}])
def test_weighted_split_within_5_percent(weights):
    wrr = SmoothWeightedRoundRobin()
    n = 10_000
    picks = Counter(wrr.pick(weights) for _ in range(n))
    total = sum(weights.values())
    for name, w in weights.items():
        assert abs(picks[name] / n - w / total) <= 0.05 * w / total


def test_smooth_split_interleaves():
    wrr = SmoothWeightedRoundRobin()
    seq = [wrr.pick({"a": 2, "b": 1}) for _ in range(6)]
    assert seq == ["a", "b", "a", "a", "b", "a"]


def test_weight_zero_gets_nothing_and_all_zero_is_equal():
    wrr = SmoothWeightedRoundRobin()
    assert Counter(wrr.pick({"a": 1.0, "z": 0.0}) for _ in range(1000))["z"] == 0
    assert wrr.pick({"a": 0, "b": 0}) is None
    assert effective_weights({"a": 0, "b": 0}) == {"a": 1.0, "b": 1.0}
    assert effective_weights({"a": 0, "b": 2}) == {"a": 0.0, "b": 2.0}


def test_balancer_never_sends_to_weight_zero_pool_even_on_failover():
    pools = [PoolView("a", 1.0, [EndpointLoad("http://a1", "a")]), PoolView("z", 0.0, [EndpointLoad("http://z1", "z")])]
    b = Balancer()
    att = Attempts()
    assert b.next_target(pools, GEN, 0.0, att).pool == "a"
    att.failures = 1
    assert b.next_target(pools, GEN, 0.0, att) is None


def test_predicted_prefers_fast_and_idle_workers():
    fast = EndpointLoad("http://fast", "p", rate=40.0)
    slow = EndpointLoad("http://slow", "p", rate=10.0)
    assert choose_endpoint([slow, fast], GEN, 0.0)[0] is fast
    fast.dispatched(200.0)  # 5 s of work queued on the fast one; slow would take 4 s
    assert choose_endpoint([slow, fast], GEN, 0.0)[0] is slow
    # least-requests sees only counts, round-robin only turns
    assert choose_endpoint([slow, fast], GEN, 0.0, "least_requests")[0] is slow
    assert choose_endpoint([slow, fast], GEN, 0.0, "round_robin")[0] is slow


def test_reported_backlog_counts_and_ages():
    a = EndpointLoad("http://a", "p")
    b = EndpointLoad("http://b", "p")
    a.report(10.0, now=100.0)  # another router's work
    assert choose_endpoint([a, b], GEN, 100.0)[0] is b
    assert a.wait_s(105.0) == pytest.approx(5.0)
    assert a.wait_s(200.0) == 0.0


def test_rate_learning_converges():
    ep = EndpointLoad("http://a", "p", rate=20.0)
    for _ in range(60):
        ep.learn(units_ahead=0.0, units=40.0, latency_s=0.5)  # truly 80 units/s
    assert ep.rate == pytest.approx(80.0, rel=0.02)


def test_unusable_workers_are_skipped():
    a = EndpointLoad("http://a", "p", down_until=10.0)
    b = EndpointLoad("http://b", "p", saturated_until=10.0)
    c = EndpointLoad("http://c", "p", ready=False)
    assert choose_endpoint([a, b, c], GEN, 5.0) is None
    assert choose_endpoint([a, b, c], GEN, 10.0)[0].url in ("http://a", "http://b")
    d = EndpointLoad("http://d", "p", inflight=2)
    assert choose_endpoint([d], GEN, 0.0, max_inflight=2) is None


def test_rendezvous_is_stable_and_moves_little():
    urls = [f"http://w{i}" for i in range(5)]
    keys = [f"tpl-{i}" for i in range(500)]
    home = {k: rendezvous_rank(k, urls)[0] for k in keys}
    assert home == {k: rendezvous_rank(k, list(reversed(urls)))[0] for k in keys}
    assert len(set(home.values())) == 5
    fewer = [u for u in urls if u != "http://w2"]
    moved = [k for k in keys if rendezvous_rank(k, fewer)[0] != home[k]]
    assert all(home[k] == "http://w2" for k in moved)  # only the lost worker's templates move


def test_edit_goes_home_unless_home_is_backed_up():
    eps = [EndpointLoad(f"http://w{i}", "p") for i in range(4)]
    cost = costing.RequestCost("edit", units=10.0, uncached_units=40.0, template_id="tpl-7")
    home_url = rendezvous_rank("tpl-7", [e.url for e in eps])[0]
    home = next(e for e in eps if e.url == home_url)
    ep, units = choose_endpoint(eps, cost, 0.0)
    assert ep is home and units == 10.0
    home.dispatched(20.0)  # 1 s ahead; cached still wins (1.5 s vs 2 s elsewhere)
    assert choose_endpoint(eps, cost, 0.0)[0] is home
    home.dispatched(60.0)  # 4 s ahead: recomputing elsewhere is faster
    ep, units = choose_endpoint(eps, cost, 0.0)
    assert ep is not home and units == 40.0
    home.down_until = 100.0  # home gone: the next in rank becomes home (cached cost)
    home.inflight_units = 0.0
    ep, units = choose_endpoint(eps, cost, 0.0)
    assert ep.url == rendezvous_rank("tpl-7", [e.url for e in eps])[1] and units == 10.0


def test_failover_order_other_worker_then_other_pool():
    a1, a2 = EndpointLoad("http://a1", "a"), EndpointLoad("http://a2", "a")
    b1, c1 = EndpointLoad("http://b1", "b"), EndpointLoad("http://c1", "c")
    pools = [PoolView("a", 10.0, [a1, a2]), PoolView("b", 1.0, [b1]), PoolView("c", 2.0, [c1])]
    bal = Balancer()
    att = Attempts()
    first = bal.next_target(pools, GEN, 0.0, att)
    assert first.pool == "a"
    att.failures = 1
    second = bal.next_target(pools, GEN, 0.0, att)
    assert second.pool == "a" and second.endpoint is not first.endpoint
    att.failures = 2
    assert bal.next_target(pools, GEN, 0.0, att).pool == "c"  # highest remaining weight
    att.failures = 3
    assert bal.next_target(pools, GEN, 0.0, att).pool == "b"
    assert bal.next_target(pools, GEN, 0.0, att) is None


def test_saturation_retry_after():
    a = EndpointLoad("http://a", "a", saturated_until=7.0)
    b = EndpointLoad("http://b", "b", saturated_until=3.5)
    pools = [PoolView("a", 1.0, [a]), PoolView("b", 1.0, [b])]
    assert saturation_retry_after(pools, 1.0, 128) == pytest.approx(2.5)
    b.saturated_until = 0.0
    assert saturation_retry_after(pools, 1.0, 128) is None
    assert saturation_retry_after([PoolView("a", 1.0, [])], 1.0, 128) is None


def test_cost_scales_with_steps_size_images_guidance():
    base = costing.generation_units(20, 512, 512, 1, 7.5)
    assert base == 40.0
    assert costing.generation_units(40, 512, 512, 1, 7.5) == 2 * base
    assert costing.generation_units(20, 1024, 1024, 1, 7.5) == 4 * base
    assert costing.generation_units(20, 512, 512, 3, 7.5) == 3 * base
    assert costing.generation_units(20, 512, 512, 1, 1.0) == base / 2
    c = costing.generation_cost({"prompt": "x", "size": "256x256"}, default_steps=20, default_size=512)
    assert c.units == base / 4 and c.kind == "generation"
    assert costing.parse_size("auto", 512) == (512, 512) and costing.parse_size("7xq", 64) == (64, 64)


def test_edit_cost_uses_mask_ratio_only_with_a_template():
    fields = {"prompt": "x", "size": "512x512", "num_inference_steps": "20", "template_id": "t"}
    c = costing.edit_cost(fields, 0.1, 20, 512)
    assert c.uncached_units == 40.0
    assert c.units == pytest.approx(40.0 * (costing.EDIT_FLOOR + (1 - costing.EDIT_FLOOR) * 0.1))
    plain = costing.edit_cost({k: v for k, v in fields.items() if k != "template_id"}, 0.1, 20, 512)
    assert plain.units == plain.uncached_units == 40.0 and plain.template_id is None


def test_mask_ratio_from_png():
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent = to edit
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    assert costing.mask_ratio_from_png(buf.getvalue()) == pytest.approx(0.5, abs=0.02)
    rgb = io.BytesIO()
    Image.new("RGB", (8, 8)).save(rgb, format="PNG")
    assert costing.mask_ratio_from_png(rgb.getvalue()) == 1.0
    assert costing.mask_ratio_from_png(b"not a png") is None
