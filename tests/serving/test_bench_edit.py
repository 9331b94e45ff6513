"""The pure parts of `stepfleet bench edit`: trace, cost model, replay, masked PSNR/SSIM (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepfleet.serving.bench.edit_replay import (
    EditCostTable,
    edit_trace,
    masked_psnr,
    masked_ssim,
    replay_diffusers,
    replay_edit_engine,
    ssim_map,
)
from stepfleet.serving.planner import PlannerConfig


def table(diffusers_s: float = 12.0) -> EditCostTable:
    # shared 0.1 s per step, 1.0 s per image in full, cached 0.3 s at ratio 0.05 and 0.6 s at 0.5
    return EditCostTable(
        full_step_s={1: 1.1, 4: 4.1},
        cached_step_s={0.05: {4: 0.1 + 4 * 0.3}, 0.5: {4: 0.1 + 4 * 0.6}},
        encode_s=0.05,
        decode_s=1.0,
        diffusers_s=diffusers_s,
    )


def test_edit_trace_is_seeded_and_ratios_in_range():
    a, b = edit_trace(0.5, 200, seed=1), edit_trace(0.5, 200, seed=1)
    assert a == b
    assert all(0.05 <= r.ratio <= 0.5 for r in a)
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:], strict=False))
    assert 0.4 < (len(a) - 1) / a[-1].arrival_s < 0.6


def test_cost_table_interpolates_per_image_costs():
    t = table()
    assert t.per_image_s(None) == pytest.approx(1.0)
    assert t.per_image_s(0.05) == pytest.approx(0.3)
    assert t.per_image_s(0.275) == pytest.approx(0.45)
    assert t.per_image_s(0.01) == pytest.approx(0.3)  # clamped at the ends
    assert t.per_image_s(0.9) == pytest.approx(0.6)
    assert t.step_s([None, 0.5]) == pytest.approx(0.1 + 1.0 + 0.6)


def test_replay_cached_beats_uncached_beats_diffusers():
    t = table()
    trace = edit_trace(0.9 / t.diffusers_s, 400, seed=3)
    cfg = PlannerConfig(max_batch=4)
    d = replay_diffusers(trace, t)
    u = replay_edit_engine(trace, t, 10, False, cfg)
    c = replay_edit_engine(trace, t, 10, True, cfg)
    assert d["completed"] == u["completed"] == c["completed"] == 400
    assert c["mean_s"] < u["mean_s"] < d["mean_s"]
    # An idle system: one request costs encode + steps + decode.
    one = edit_trace(1.0, 1, seed=0)
    assert replay_edit_engine(one, t, 10, False, cfg)["mean_s"] == pytest.approx(0.05 + 10 * 1.1 + 1.0)
    assert replay_diffusers(one, t)["mean_s"] == pytest.approx(12.0)


def test_masked_psnr():
    a = np.zeros((8, 8, 3))
    b = a.copy()
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    b[4:] = 1.0  # differences only outside the mask
    assert masked_psnr(a, b, mask) == math.inf
    b[:4] += 0.1
    assert masked_psnr(a, b, mask) == pytest.approx(20.0)


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    mask = np.ones((32, 32), bool)
    assert masked_ssim(a, a, mask) == pytest.approx(1.0)
    assert np.allclose(ssim_map(a[..., 0], a[..., 0]), 1.0)
    slightly = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    badly = rng.random(a.shape)
    s1, s2 = masked_ssim(a, slightly, mask), masked_ssim(a, badly, mask)
    assert 0.8 < s1 < 1.0 and s2 < 0.2
    # Constant images: the stabilising constants make SSIM of two equal flats exactly 1.
    flat = np.full((16, 16), 0.5)
    assert masked_ssim(flat, flat, np.ones((16, 16), bool)) == pytest.approx(1.0)
