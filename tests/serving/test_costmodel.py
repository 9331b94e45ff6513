"""The online step-cost model: smoothing, interpolation, and batch sizing that noise cannot fool."""

import pytest

from stepfleet.serving.costmodel import StepCostModel

S = (4, 32, 32)


def test_interpolates_and_extrapolates_per_row():
    m = StepCostModel()
    m.observe(S, 2, 0.10)
    m.observe(S, 6, 0.30)
    assert m.step_seconds(S, 4) == pytest.approx(0.20)
    assert m.step_seconds(S, 12) == pytest.approx(0.60)
    assert m.step_seconds(S, 1) == pytest.approx(0.05)


def test_unseen_shape_scales_by_tokens():
    m = StepCostModel()
    m.observe(S, 2, 0.10)
    assert m.step_seconds((4, 64, 64), 2) == pytest.approx(0.40)


def test_smoothing_follows_drift():
    m = StepCostModel(alpha=0.5)
    m.observe(S, 2, 0.10)
    m.observe(S, 2, 0.20)
    assert m.step_seconds(S, 2) == pytest.approx(0.15)


def _observe(m, rows, seconds, times=5):
    for _ in range(times):
        m.observe(S, rows, seconds)


def test_efficient_rows_ignores_steps_that_interference_slowed():
    m = StepCostModel()
    for rows, s in ((2, 0.10), (4, 0.12), (6, 0.18)):  # batching pays up to 4 rows only
        _observe(m, rows, s)
    assert m.efficient_rows(S, 0.05) == 4
    _observe(m, 4, 0.50, times=2)  # a neighbour process slowed two steps down
    assert m.efficient_rows(S, 0.05) == 4
    assert m.efficient_rows((4, 8, 8), 0.05) is None  # nothing measured: no cap


def test_a_much_used_batch_size_does_not_look_cheaper_for_its_lucky_runs():
    # Running 2 rows hundreds of times turns up a rare fast step; compared with the few
    # runs of 4 rows, the fastest-ever figure would say batching does not pay and pin
    # the batch at 2 rows forever. The median of recent steps does not drift that way.
    m = StepCostModel()
    for i in range(300):
        m.observe(S, 2, 0.040 if i == 150 else 0.066)
    _observe(m, 4, 0.105, times=4)
    assert m.efficient_rows(S, 0.05) is None  # 4 rows: 26 ms per row against 33 ms


def test_too_few_samples_do_not_cap_the_batch():
    m = StepCostModel()
    _observe(m, 2, 0.05)
    m.observe(S, 4, 0.30)  # one slow first run of a new size
    assert m.efficient_rows(S, 0.05) is None


def test_a_calibrated_curve_decides_batch_sizes_and_seeds_estimates():
    m = StepCostModel()
    _observe(m, 2, 0.05)
    _observe(m, 4, 0.20)  # online: batching looks useless
    m.calibrate(S, {2: 0.057, 4: 0.093, 6: 0.140, 8: 0.168})
    assert m.efficient_rows(S, 0.05) == 4  # 6 rows: 23.3 ms per row, no better than 4
    fresh = StepCostModel()
    fresh.calibrate(S, {2: 0.057, 4: 0.093})
    assert fresh.step_seconds(S, 4) == pytest.approx(0.093)


def test_a_variant_is_estimated_like_its_shape_until_measured_and_learns_apart():
    from stepfleet.serving.costmodel import cost_key

    m = StepCostModel()
    _observe(m, 2, 0.10)
    _observe(m, 4, 0.15)  # full steps: batching pays
    edit = cost_key(S, "cached-edit")
    assert m.step_seconds(edit, 2) == pytest.approx(0.10)  # nothing measured: like its shape
    _observe(m, 4, 0.15)
    for _ in range(5):
        m.observe(edit, 2, 0.05)
        m.observe(edit, 4, 0.12)  # cached edits: batching costs more per row
    assert m.step_seconds(edit, 2) == pytest.approx(0.05)
    assert m.efficient_rows(edit, 0.05) == 2
    assert m.efficient_rows(S, 0.05) is None


def test_mixed_batches_feed_the_estimate_but_not_batch_sizing():
    m = StepCostModel()
    m.observe(S, 4, 0.2, reference=False)
    assert m.step_seconds(S, 4) == pytest.approx(0.2)
    assert m.reference_curve(S) == {}
