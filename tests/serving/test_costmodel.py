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


def test_efficient_rows_uses_fastest_runs_so_interference_cannot_shrink_batches():
    m = StepCostModel()
    for rows, s in ((2, 0.10), (4, 0.12), (6, 0.18)):  # batching pays up to 4 rows only
        m.observe(S, rows, s)
    assert m.efficient_rows(S, 0.05) == 4
    m.observe(S, 4, 0.50)  # a neighbour process slowed one step down
    assert m.efficient_rows(S, 0.05) == 4
    assert m.efficient_rows((4, 8, 8), 0.05) is None  # nothing measured: no cap
