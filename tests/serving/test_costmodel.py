"""The online step-cost model: robust estimates, interpolation, drift, and batch sizing that noise cannot fool."""

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


def test_estimate_is_the_median_of_recent_steps():
    m = StepCostModel()
    m.observe(S, 2, 0.10)
    m.observe(S, 2, 0.20)
    assert m.step_seconds(S, 2) == pytest.approx(0.15)
    m.observe(S, 2, 0.11)
    assert m.step_seconds(S, 2) == pytest.approx(0.11)


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


def test_a_calibrated_curve_seeds_batch_sizing_until_sizes_are_measured():
    m = StepCostModel()
    m.calibrate(S, {2: 0.057, 4: 0.093, 6: 0.140, 8: 0.168})
    assert m.efficient_rows(S, 0.05) == 4  # 6 rows: 23.3 ms per row, no better than 4
    assert m.step_seconds(S, 4) == pytest.approx(0.093)
    # Fresh measurements replace the seed of their size once there are enough of them.
    _observe(m, 4, 0.080, times=m.min_samples - 1)
    assert m.step_seconds(S, 4) == pytest.approx(0.093)
    m.observe(S, 4, 0.080)
    assert m.reference_curve(S)[4] == pytest.approx(0.080)


def test_seeds_of_sizes_not_run_follow_the_drift_of_the_measured_ones():
    # Calibrated on a quiet machine; then a neighbour makes every step 1.5x slower. The engine
    # only runs 2 and 4 rows: 6 and 8 must slow down alike, or a bigger batch would look like
    # a bargain (and, the other way round, a calibration timed under noise would look useless).
    m = StepCostModel()
    m.calibrate(S, {2: 0.050, 4: 0.080, 6: 0.110, 8: 0.140})
    _observe(m, 2, 0.075)
    _observe(m, 4, 0.120)
    assert m.drift(S) == pytest.approx(1.5)
    assert m.reference_curve(S) == pytest.approx({2: 0.075, 4: 0.120, 6: 0.165, 8: 0.210})


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


def test_best_throughput_rows_looks_past_a_flat_stretch():
    m = StepCostModel()
    for rows, s in ((2, 0.100), (4, 0.200), (6, 0.240), (8, 0.330)):  # per row 50, 50, 40, 41 ms
        _observe(m, rows, s)
    assert m.efficient_rows(S, 0.05) == 2  # the walk stops at the first flat pair
    assert m.best_throughput_rows(S) == 6  # the backlog rule takes the gain at 6 rows
    _observe(m, 8, 0.300, times=15)  # now 37.5 ms per row at 8: the biggest is best
    assert m.best_throughput_rows(S) is None


def test_old_samples_decay_and_a_stale_point_falls_back_to_its_seed():
    m = StepCostModel(max_age_s=10.0)
    m.calibrate(S, {2: 0.05, 4: 0.08})
    for i in range(5):
        m.observe(S, 4, 0.20, at=float(i))  # a slow minute long ago
    for i in range(5):
        m.observe(S, 2, 0.05, at=100.0 + i)  # 2 rows run as calibrated, now
    assert m.drift(S) == pytest.approx(1.0)
    assert m.step_seconds(S, 4) == pytest.approx(0.08)  # the old slow samples no longer count


def test_a_noisy_run_and_a_shift_are_followed_without_being_fooled_by_single_outliers():
    """Steps of ~50 ms with jitter and, now and then, one step descheduled for 10x as long;
    then a neighbour arrives and every step takes 1.6x as long. The estimate must stay near
    the truth through the outliers and be on the new level within a second of steps."""
    import random

    rng = random.Random(3)
    m = StepCostModel()
    m.calibrate(S, {2: 0.050, 4: 0.080})
    t = 0.0

    def step(rows: int, base: float) -> None:
        nonlocal t
        seconds = base * rng.uniform(0.95, 1.05)
        if rng.random() < 0.08:
            seconds *= 10  # descheduled
        t += seconds
        m.observe(S, rows, seconds, at=t)

    worst = 0.0
    for i in range(200):
        step(2, 0.050)
        if i >= m.window:
            worst = max(worst, abs(m.step_seconds(S, 2) / 0.050 - 1))
    assert worst < 0.1
    # Outliers in a row do not move it either: three descheduled steps in a window of 15.
    for _ in range(3):
        m.observe(S, 2, 0.5, at=t)
    assert m.step_seconds(S, 2) == pytest.approx(0.050, rel=0.1)
    # The shift: within a second of steps the estimate is on the new level.
    shift_at = t
    while t - shift_at < 1.0:
        step(2, 0.080)
    assert m.step_seconds(S, 2) == pytest.approx(0.080, rel=0.1)
    # 4 rows never ran since calibration: its seed follows the drift of the size that did.
    assert m.step_seconds(S, 4) == pytest.approx(0.080 * 0.080 / 0.050, rel=0.1)
    # And when the neighbour leaves, back to the old level as quickly.
    leave_at = t
    while t - leave_at < 1.0:
        step(2, 0.050)
    assert m.step_seconds(S, 2) == pytest.approx(0.050, rel=0.1)


def test_under_a_backlog_a_seed_alone_never_rules_out_a_bigger_batch():
    # Calibrated while a neighbour held the core: batching looked useless. Only measuring a
    # bigger batch may say so now; until then (and again once that measurement ages out) the
    # backlog rule explores upward.
    m = StepCostModel(max_age_s=10.0)
    m.calibrate(S, {2: 0.05, 4: 0.10, 6: 0.15, 8: 0.20})
    for i in range(5):
        m.observe(S, 2, 0.05, at=float(i))
    assert m.efficient_rows(S, 0.05) == 2  # the latency-first rule still trusts the seeds
    assert m.best_throughput_rows(S) is None
    for i in range(5):
        m.observe(S, 4, 0.10, at=5.0 + i)  # measured: 4 rows really are no better per row
    assert m.best_throughput_rows(S) == 2
    for i in range(5):
        m.observe(S, 2, 0.05, at=30.0 + i)  # 20 s later the 4-row measurement is stale: retry
    assert m.best_throughput_rows(S) is None
