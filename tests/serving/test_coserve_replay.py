"""The coserve replay (pure): every policy on one seeded trace; stepfleet's rule pays off on images."""

from stepfleet.serving.bench.coserve_replay import (
    POLICIES,
    CoserveSetup,
    KindCost,
    compare,
    mixed_capacity_rps,
    mixed_trace,
    replay,
    static_partition,
)

# Measured on tiny-wan at 128x128 (81-frame videos) on the project's CPU machine.
IMAGE = KindCost((16, 1, 16, 16), {2: 0.0034, 4: 0.0048, 8: 0.0076}, steps=20, encode_s=0.05, decode_s=0.1)
VIDEO = KindCost((16, 21, 16, 16), {2: 0.042, 4: 0.110, 8: 0.191}, steps=30, encode_s=0.05, decode_s=8.4)


def setup(image_scale=3.0, video_scale=3.0):
    return CoserveSetup(IMAGE, VIDEO, image_scale * IMAGE.solo_s(), video_scale * VIDEO.solo_s())


def test_trace_is_seeded_and_mixed():
    a, b = mixed_trace(10.0, 400, 0.15, seed=1), mixed_trace(10.0, 400, 0.15, seed=1)
    assert a == b
    share = sum(1 for x in a if x.kind == "video") / len(a)
    assert 0.10 < share < 0.20


def test_every_policy_finishes_every_request():
    rate = 0.9 * mixed_capacity_rps(IMAGE, VIDEO, 0.15)
    trace = mixed_trace(rate, 300, 0.15, seed=0)
    for policy in POLICIES:
        r = replay(trace, setup(), policy)
        assert r["image"]["completed"] + r["video"]["completed"] == len(trace), policy
        assert r["videos_unfinished"] == 0


def test_video_preemption_raises_image_attainment_and_no_video_starves():
    result = compare(setup(), load=0.9, count=400, seeds=(0,))
    table = result["policies"]
    assert table["stepfleet"]["image_attainment"] >= 0.95
    assert table["stepfleet"]["image_attainment"] > table["no-video-preemption"]["image_attainment"] + 0.2
    assert table["stepfleet"]["attainment"] > max(table[p]["attainment"] for p in ("fifo", "sjf"))
    assert table["stepfleet"]["video_pauses"] > 0 and table["no-video-preemption"]["video_pauses"] == 0
    assert result["criteria"]["no_video_starves"]


def test_static_partition_is_the_best_fixed_split_not_only_the_proportional_one():
    # Videos ten times heavier on the denoiser: most of the offered work is video, so the
    # proportional split starves images; the search must find a split at least as good.
    heavy = KindCost(VIDEO.shape, {r: 10 * s for r, s in VIDEO.step_s_by_rows.items()}, steps=30,
                     encode_s=0.05, decode_s=8.4)
    s = CoserveSetup(IMAGE, heavy, 3.0 * IMAGE.solo_s(), 3.0 * heavy.solo_s())
    trace = mixed_trace(0.9 * mixed_capacity_rps(IMAGE, heavy, 0.15), 300, 0.15, seed=0)
    best = static_partition(trace, s)
    proportional = best["static_proportional_image_share"]
    assert proportional < 0.2  # videos carry most of the work
    at_proportional = static_partition(trace, s, image_shares=())
    assert at_proportional["static_image_share"] == proportional
    assert best["attainment"] >= at_proportional["attainment"]
    assert best["static_image_share"] > proportional
    assert replay(trace, s, "static-oracle")["attainment"] == best["attainment"]
    assert replay(trace, s, "static")["attainment"] == at_proportional["attainment"]
