"""Video capacity apart from image capacity: demand planned in replica-seconds per kind."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from policy_fixtures import paper_spec, steady

from stepfleet.operator.policy import (
    ControlSettings,
    PolicySpec,
    PolicyState,
    PoolSpec,
    Signals,
    SloSpec,
    StepMemory,
    control_step,
    decide,
)
from stepfleet.operator.policy.costmodel import replicas_for, servable_rps
from stepfleet.operator.policy.kinds import (
    DEFAULT_VIDEO_COST_IMAGES,
    units_per_request,
    video_share,
    video_throughput,
)
from stepfleet.operator.policy.pools import resolve

#: One pool: 2 images/s or 0.1 videos/s per replica (a video is 20 images of device time).
ONE = PolicySpec(slo=SloSpec(latency_s=3.0), pools=(
    PoolSpec("gpu", 1.0, 2.0, 0.5, min_replicas=0, max_replicas=500,
             video_throughput_rps_per_replica=0.1),
))


def test_video_heavy_demand_asks_for_more_replicas_than_as_many_images():
    images, _ = decide(steady(ONE, 0, 10.0), PolicyState(), ONE)
    mixed, _ = decide(replace(steady(ONE, 0, 10.0), video_share=0.2), PolicyState(), ONE)
    # 8 images/s over 2/s per replica + 2 videos/s over 0.1/s per replica = 24 replica-seconds/s.
    assert mixed.replicas["gpu"] >= math.ceil(8.0 / 2.0 + 2.0 / 0.1)
    assert mixed.replicas["gpu"] > 3 * images.replicas["gpu"]
    assert images.replicas["gpu"] <= math.ceil(10.0 * 1.03 / 2.0 / 0.9)
    assert any("2.000 videos/s (20.0% videos)" in r for r in mixed.reasons)
    assert not any("videos/s" in r for r in images.reasons)


def test_replicas_follow_the_per_kind_formula_through_the_queueing_margin():
    view = resolve(ONE, replace(steady(ONE, 0, 10.0), video_share=0.25))[0]
    assert view.units_per_request == pytest.approx(0.75 + 0.25 * 2.0 / 0.1)
    # The mix is sized as its image-equivalents: 10 rps of it = 10 * 5.75 images/s.
    assert view.replicas_for(10.0) == replicas_for(57.5, 2.0, 0.5, 3.0, view.allowed_late,
                                                    view.service_cv, view.max_utilization)
    n = view.replicas_for(10.0)
    assert view.servable(n) >= 10.0 - 1e-9 > view.servable(n - 1)


def test_images_only_plan_exactly_as_before_whatever_the_video_figures():
    """No video traffic: the video throughput (declared, derived or measured) changes nothing."""
    base = paper_spec()
    fast_video = replace(base, pools=tuple(replace(p, video_throughput_rps_per_replica=p.throughput_rps_per_replica)
                                           for p in base.pools))
    for rps, ready in ((3.0, None), (60.0, {"inf2": 40}), (400.0, {"inf2": 100, "a10g": 50})):
        obs = steady(base, 0, rps, ready=ready, trend=0.01)
        plan, state = decide(obs, PolicyState(), base)
        for spec in (fast_video, base):
            again, again_state = decide(replace(obs, video_share=0.0), PolicyState(), spec)
            assert again == plan and again_state == state
    view = resolve(base, steady(base, 0, 10.0))[0]
    assert view.units_per_request == 1.0 and view.request_throughput_rps == view.throughput_rps
    for n in (1, 3, 17):  # the very arithmetic of the image-only policy, bit for bit
        assert view.servable(n) == servable_rps(n, view.throughput_rps, view.latency_s, view.slo_latency_s,
                                                view.allowed_late, view.service_cv, view.max_utilization)


def test_the_mix_decides_which_pool_is_cheapest_per_request():
    """A pool cheap per image but poor at video loses the cost order once videos come."""
    spec = PolicySpec(slo=SloSpec(latency_s=3.0), pools=(
        PoolSpec("image-fast", 1.0, 2.0, 0.5, max_replicas=400, video_throughput_rps_per_replica=0.02),
        PoolSpec("video-fast", 1.1, 2.0, 0.5, max_replicas=400, video_throughput_rps_per_replica=0.2),
    ), control=ControlSettings(switch_margin=0.0))
    images, _ = decide(steady(spec, 0, 20.0), PolicyState(), spec)
    assert images.replicas["image-fast"] > 0 and images.replicas["video-fast"] == 0
    mixed, _ = decide(replace(steady(spec, 0, 20.0), video_share=0.1), PolicyState(), spec)
    assert mixed.replicas["video-fast"] > 0 and mixed.replicas["image-fast"] == 0


def test_hedging_holds_the_video_work_too():
    """The spot pool is hedged at half the demand: with videos, half the demand is more replicas."""
    spec = PolicySpec(slo=SloSpec(latency_s=3.0), pools=(
        PoolSpec("spot", 0.5, 2.0, 0.5, max_replicas=400, capacity_type="spot",
                 video_throughput_rps_per_replica=0.1),
        PoolSpec("ondemand", 1.0, 2.0, 0.5, max_replicas=400, video_throughput_rps_per_replica=0.1),
    ))
    images, _ = decide(steady(spec, 0, 10.0, ready={"spot": 6}), PolicyState(), spec)
    mixed, _ = decide(replace(steady(spec, 0, 10.0, ready={"spot": 6}), video_share=0.2), PolicyState(), spec)
    assert images.replicas["ondemand"] >= 3
    assert mixed.replicas["ondemand"] >= math.ceil(0.5 * (8.0 / 2.0 + 2.0 / 0.1))
    assert mixed.replicas["ondemand"] > 3 * images.replicas["ondemand"]


def test_video_throughput_defaults_to_a_documented_share_of_the_image_figure():
    assert video_throughput(None, 3.0) == pytest.approx(3.0 / DEFAULT_VIDEO_COST_IMAGES)
    assert video_throughput(0.05, 3.0) == 0.05
    spec = replace(ONE, pools=(replace(ONE.pools[0], video_throughput_rps_per_replica=None),))
    assert resolve(spec, replace(steady(spec, 0, 1.0), video_share=0.5))[0].units_per_request == pytest.approx(
        0.5 + 0.5 * DEFAULT_VIDEO_COST_IMAGES)
    assert units_per_request(0.0, 2.0, 0.0) == 1.0 and units_per_request(1.0, 2.0, 0.5) == 4.0


def test_a_measured_video_throughput_wins_over_the_declared_one():
    obs = steady(ONE, 0, 10.0)
    obs = replace(obs, video_share=0.5,
                  pools=tuple(replace(p, video_throughput_rps_per_replica=0.4) for p in obs.pools))
    assert resolve(ONE, obs)[0].units_per_request == pytest.approx(0.5 + 0.5 * 2.0 / 0.4)


def test_video_share_is_a_ratio_over_the_kept_samples():
    total = ((10.0, 4.0), (20.0, 6.0))
    assert video_share(total, ((10.0, 1.0), (20.0, 0.0))) == pytest.approx(0.1)
    assert video_share(total, ((5.0, 9.0), (20.0, 0.5))) == pytest.approx(0.05)  # t=5 not kept
    assert video_share((), ()) == 0.0 and video_share(((1.0, 0.0),), ((1.0, 0.0),)) == 0.0


def test_the_control_step_carries_the_video_rate_beside_the_demand():
    memory = StepMemory()
    plans = []
    for i in range(6):
        plan, memory = control_step(memory, Signals(arrival_rps=10.0, window_s=60.0, video_rps=1.0),
                                    ONE, 60.0 * (i + 1))
        plans.append(plan)
    assert [t for t, _ in memory.video_samples] == [t for t, _ in memory.samples]
    assert any("(10.0% videos)" in r for r in plans[-1].reasons)
    images = StepMemory()
    for i in range(4):
        image_plan, images = control_step(images, Signals(arrival_rps=10.0, window_s=60.0), ONE, 60.0 * (i + 1))
    assert plans[-1].replicas["gpu"] > image_plan.replicas["gpu"]
    # A step in demand restarts the fit, and the video share with it.
    plan, memory = control_step(memory, Signals(arrival_rps=100.0, window_s=60.0, video_rps=0.0), ONE, 420.0)
    assert len(memory.samples) == 1 and memory.video_samples == ((390.0, 0.0),)
    assert not any("videos/s" in r for r in plan.reasons)
