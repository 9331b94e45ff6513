"""Edit traces, a step-cost model for masked batches, a discrete-event replay, and image metrics.

Pure parts of `stepfleet bench edit` (no model needed), so they are unit-tested on their own.

Cost model: a step of the engine costs a shared part plus, per image in the batch, a part
that depends on how much of it is recomputed: full compute (no cache) or the cached path at
its mask ratio. Measured in the same run: full steps with 1 and `k` images (→ shared part
and per-image full cost), and cached steps with `k` images at a few mask ratios (→ per-image
cached cost, linearly interpolated between the measured ratios, clamped at the ends).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stepfleet.serving.bench.replay import simulate_step_loop
from stepfleet.serving.bench.trace import latency_stats
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.planner import DEFAULT_SLO_SCALE, PlannerConfig, StepPlanner


@dataclass(frozen=True)
class EditRequest:
    id: str
    arrival_s: float
    ratio: float  # fraction of the image's area to edit
    seed: int  # placement of the mask and the prompt's variety
    prompt: str


def edit_trace(rate_rps: float, count: int, seed: int, lo: float = 0.05, hi: float = 0.5) -> list[EditRequest]:
    """`count` edits with exponential inter-arrival gaps; mask ratios uniform in [lo, hi]."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(count):
        if i:
            t += rng.expovariate(rate_rps)
        out.append(EditRequest(id=f"e{i:04d}", arrival_s=t, ratio=rng.uniform(lo, hi), seed=rng.randrange(2**31),
                               prompt=f"an edit number {i}"))
    return out


@dataclass(frozen=True)
class EditCostTable:
    """What one run measured (seconds)."""

    #: Full-compute engine step by images in the batch (each image: 2 UNet rows with guidance).
    full_step_s: dict[int, float]
    #: Cached-path engine step with `k` images all at one mask ratio: {ratio: {k: seconds}}.
    cached_step_s: dict[float, dict[int, float]]
    encode_s: float  # the engine's per-request preparation (prompt encoding, mask pyramid)
    decode_s: float  # VAE decode + composite
    diffusers_s: float  # one diffusers inpainting call, end to end
    #: Cached-path step of a single image by mask ratio (reported; the replay uses the batch figures).
    cached_one_image_step_s: dict[float, float] | None = None

    def cost_model(self, shape: tuple[int, int, int]) -> StepCostModel:
        """An engine cost model calibrated with the full-compute steps, as a warmed-up worker's is
        (cached edits learn their own curve online, `costmodel.cost_key`)."""
        cost = StepCostModel()
        cost.calibrate(shape, {2 * k: s for k, s in self.full_step_s.items()})  # guidance: 2 rows per image
        return cost

    def _shared_and_full(self) -> tuple[float, float]:
        ks = sorted(self.full_step_s)
        if len(ks) == 1:
            return 0.0, self.full_step_s[ks[0]] / ks[0]
        k0, k1 = ks[0], ks[-1]
        per = (self.full_step_s[k1] - self.full_step_s[k0]) / (k1 - k0)
        shared = max(0.0, self.full_step_s[k0] - k0 * per)
        return shared, per

    def per_image_s(self, ratio: float | None) -> float:
        """Per-image part of a step: full compute (None) or the cached path at `ratio`."""
        shared, full = self._shared_and_full()
        if ratio is None:
            return full
        pts = sorted((r, max(1e-9, (by_k[max(by_k)] - shared) / max(by_k))) for r, by_k in self.cached_step_s.items())
        if ratio <= pts[0][0]:
            return pts[0][1]
        for (r0, c0), (r1, c1) in zip(pts, pts[1:], strict=False):
            if ratio <= r1:
                return c0 + (c1 - c0) * (ratio - r0) / (r1 - r0)
        return pts[-1][1]

    def step_s(self, ratios: Sequence[float | None]) -> float:
        """One engine step over a batch; each entry a request's mask ratio (None: full compute)."""
        shared, _ = self._shared_and_full()
        return shared + sum(self.per_image_s(r) for r in ratios)

    def as_dict(self) -> dict:
        return {
            "full_step_s_by_images": {str(k): v for k, v in sorted(self.full_step_s.items())},
            "cached_step_s_by_ratio_and_images": {
                str(r): {str(k): v for k, v in sorted(by_k.items())} for r, by_k in sorted(self.cached_step_s.items())
            },
            "cached_one_image_step_s_by_ratio": {str(r): v for r, v in sorted((self.cached_one_image_step_s
                                                                               or {}).items())},
            "encode_s": self.encode_s,
            "decode_s": self.decode_s,
            "diffusers_request_s": self.diffusers_s,
        }


def replay_diffusers(trace: Sequence[EditRequest], table: EditCostTable) -> dict[str, float]:
    """One inpainting call at a time, first come first served."""
    now = 0.0
    ordered = sorted(trace, key=lambda r: r.arrival_s)
    finishes = []
    for r in ordered:
        now = max(now, r.arrival_s) + table.diffusers_s
        finishes.append(now)
    return latency_stats([r.arrival_s for r in ordered], finishes)


def replay_edit_engine(
    trace: Sequence[EditRequest],
    table: EditCostTable,
    steps: int,
    cached: bool,
    config: PlannerConfig,
    slo_scale: float = DEFAULT_SLO_SCALE,
    shape: tuple[int, int, int] = (4, 64, 64),
) -> dict[str, float]:
    """The engine's step loop (the same `StepPlanner`) on simulated time; encode/decode serialised with steps."""
    cost = table.cost_model(shape)
    ratio_of = {r.id: (r.ratio if cached else None) for r in trace}
    return simulate_step_loop(
        [(r.id, r.arrival_s, steps) for r in trace],
        StepPlanner(config, cost),
        encode_s=table.encode_s,
        decode_s=table.decode_s,
        step_s=lambda batch: table.step_s([ratio_of[sid] for sid in batch]),
        shape=shape,
        unet_rows=2,
        slo_scale=slo_scale,
    )


# -- image metrics -------------------------------------------------------------------------
def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, peak: float = 1.0) -> float:
    """PSNR (dB) of (H, W[, C]) float images over the pixels where `mask` (H, W) is True."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64))[np.asarray(mask, bool)]
    mse = float(np.mean(d**2)) if d.size else 0.0
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array, 'reflect' borders (as scikit-image's SSIM with gaussian_weights)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    p = np.pad(x, radius, mode="symmetric")
    h, w = x.shape
    rows = sum(k[i] * p[:, i : i + w] for i in range(2 * radius + 1))
    return sum(k[i] * rows[i : i + h, :] for i in range(2 * radius + 1))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004: Gaussian window σ=1.5, K1=0.01, K2=0.03) of 2-D arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    saa = _gaussian_filter(a * a) - mu_a**2
    sbb = _gaussian_filter(b * b) - mu_b**2
    sab = _gaussian_filter(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM over the pixels where `mask` is True (channels averaged) of (H, W[, C]) images."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    m = np.asarray(mask, bool)
    vals = [ssim_map(a[..., c], b[..., c], data_range)[m].mean() for c in range(a.shape[-1])]
    return float(np.mean(vals))


__all__ = [
    "EditCostTable",
    "EditRequest",
    "edit_trace",
    "masked_psnr",
    "masked_ssim",
    "replay_diffusers",
    "replay_edit_engine",
    "ssim_map",
]
