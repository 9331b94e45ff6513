"""Shape buckets (pure) and the planner planning in them (no torch)."""

import pytest

from stepfleet.serving.compiled.buckets import (
    BucketError,
    RowBuckets,
    default_rows,
    fill_bucket,
    parse_rows,
    parse_sizes,
)
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.planner import Phase, PlannerConfig, Seq, SizingMode, StepPlanner

SHAPE = (4, 32, 32)


def test_parse_rows_and_sizes():
    assert parse_rows(" 8,1, 4,2,4") == (1, 2, 4, 8)
    assert parse_sizes("512x512, 768X512,512x512") == ((512, 512), (768, 512))
    for bad in ("", "a,2", "0,2"):
        with pytest.raises(BucketError):
            parse_rows(bad)
    for bad in ("512", "512x513", "x8", "0x8"):
        with pytest.raises(BucketError, match="bucket size"):
            parse_sizes(bad)


def test_default_rows_double_up_to_a_full_guided_batch():
    assert default_rows(4) == (1, 2, 4, 8)
    assert default_rows(3) == (1, 2, 4, 6)
    assert default_rows(1, rows_per_image=1) == (1,)
    assert default_rows(5, rows_per_image=1) == (1, 2, 4, 5)


def test_pad_to_the_next_bucket():
    b = RowBuckets((2, 4, 8))
    assert [b.pad(r) for r in (1, 2, 3, 5, 8, 9)] == [2, 2, 4, 8, 8, None]
    assert b.below(8) == 4 and b.below(2) is None
    with pytest.raises(BucketError):
        RowBuckets((4, 2))


def linear(seconds_per_row):
    return lambda rows: seconds_per_row * rows


def flat(rows):
    return 0.1  # a GPU at small batches: every bucket costs the same


def test_latency_first_fills_the_smaller_bucket_where_padding_costs_per_row():
    b = RowBuckets((2, 4, 8))
    # Two running requests (4 rows) plus one admitted (2 rows): 6 rows would pad to 8.
    v = fill_bucket([2, 2, 2], droppable_from=2, buckets=b, step_seconds=linear(0.01), throughput_first=False)
    assert (v.keep, v.bucket) == (2, 4)
    assert "filled bucket 4" in v.why
    # Running members are never dropped: with nothing admitted the batch runs padded.
    v = fill_bucket([2, 2, 2], droppable_from=3, buckets=b, step_seconds=linear(0.01), throughput_first=False)
    assert (v.keep, v.bucket) == (3, 8) and "padded to bucket 8" in v.why


def test_padding_kept_where_the_larger_bucket_is_cheaper_per_row():
    b = RowBuckets((2, 4, 8))
    v = fill_bucket([2, 2, 2], droppable_from=0, buckets=b, step_seconds=flat, throughput_first=True)
    assert (v.keep, v.bucket) == (3, 8)  # 0.1 s / 6 rows beats 0.1 s / 4 rows
    exact = fill_bucket([4, 4], droppable_from=0, buckets=b, step_seconds=flat, throughput_first=True)
    assert (exact.keep, exact.bucket, exact.why) == (2, 8, None)
    with pytest.raises(BucketError):
        fill_bucket([8, 2], droppable_from=0, buckets=b, step_seconds=flat, throughput_first=True)


def seq(sid, arrival=0.0, rows=1, unet_rows=2, phase=Phase.WAITING, done=0):
    return Seq(id=sid, shape=SHAPE, rows=rows, unet_rows=unet_rows, steps_total=10, arrival=arrival,
               phase=phase, steps_done=done)


def linear_cost():
    cost = StepCostModel()
    for rows in (2, 4, 6, 8):
        for _ in range(cost.min_samples):
            cost.observe(SHAPE, rows, 0.01 * (8 if rows > 4 else rows))  # padded: 5..8 rows cost bucket 8's step
    return cost


def test_planner_never_exceeds_the_largest_bucket():
    p = StepPlanner(PlannerConfig(max_batch=8, min_batch_gain=0.0, row_buckets=RowBuckets((2, 4, 6))),
                    StepCostModel())
    plan = p.plan([seq(s) for s in "abcdef"], now=0.0)
    assert plan.batch == ("a", "b", "c")  # 6 rows: 8 images would fit max_batch but not the buckets
    assert any("largest compiled bucket is 6" in r for r in plan.reasons)


def test_planner_fills_a_bucket_rather_than_padding_when_nothing_queues():
    p = StepPlanner(PlannerConfig(max_batch=8, min_batch_gain=0.0, row_buckets=RowBuckets((2, 4, 8))),
                    linear_cost())
    running = [seq(s, phase=Phase.RUNNING, done=1) for s in "ab"]
    plan = p.plan([*running, seq("c", arrival=0.0)], now=0.01)  # c just arrived: latency-first
    assert plan.sizing.mode is SizingMode.LIGHT
    assert plan.batch == ("a", "b") and plan.admitted == ()
    assert any("filled bucket 4" in r for r in plan.reasons)
    # Under a backlog, on a GPU-like flat curve, padding 6 rows to 8 is cheaper per row than 4: kept.
    flat_cost = StepCostModel()
    for rows in (2, 4, 6, 8):
        for _ in range(flat_cost.min_samples):
            flat_cost.observe(SHAPE, rows, 0.1)
    backlog = StepPlanner(PlannerConfig(max_batch=8, min_batch_gain=0.0, row_buckets=RowBuckets((2, 4, 8))),
                          flat_cost)
    plan = backlog.plan([*running, seq("c", arrival=0.0)], now=5.0)
    assert plan.sizing.mode is SizingMode.BACKLOG
    assert set(plan.batch) == set("abc")
    assert any("6 rows padded to bucket 8" in r for r in plan.reasons)
