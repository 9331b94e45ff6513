"""How long a denoising step takes, learned online; used for slack, Retry-After and load reports.

Pure and clock-free: the engine feeds it measured step durations, the planner and the
benchmark's replay ask it for estimates. A step's cost depends on the latent shape (tokens)
and on how many rows run together (batching is sub-linear), so the model keeps a smoothed
duration per (shape, rows) and interpolates between the rows it has seen.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field


def cost_key(shape: Hashable, variant: str | None = None) -> Hashable:
    """What step costs are learned under: the latent shape, plus a variant whose steps cost
    differently at the same shape (edits on cached template activations compute only their
    masked tokens, and on a CPU batching them costs more per image than it saves)."""
    return shape if variant is None else (shape, variant)


def _base_shape(key: Hashable) -> Hashable | None:
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str):
        return key[0]
    return None


@dataclass
class StepCostModel:
    """Exponentially smoothed step seconds per (shape key, batch rows)."""

    #: Used before anything was measured for a shape: a pessimistic guess beats zero.
    default_step_s: float = 0.05
    #: Weight of a new observation; high enough to follow drift within ~10 steps.
    alpha: float = 0.2
    table: dict[Hashable, dict[int, float]] = field(default_factory=dict)
    #: Recent step seconds per (shape, rows), for batch sizing. Their median ignores the odd
    #: step another process slowed down, and — unlike the fastest run ever seen — does not
    #: drift lower for the sizes the engine happens to run most, which made a much-used
    #: small batch look cheaper than a rarely-used big one and pinned batches small.
    recent: dict[Hashable, dict[int, deque[float]]] = field(default_factory=dict)
    window: int = 25
    #: Curves measured on purpose (`calibrate`, at warm-up): taken over the online ones.
    calibrated: dict[Hashable, dict[int, float]] = field(default_factory=dict)
    #: Online points with fewer samples than this do not count for batch sizing yet.
    min_samples: int = 3

    def observe(self, shape: Hashable, rows: int, seconds: float, reference: bool = True) -> None:
        """Record one step. `reference=False` (a batch mixing variants) feeds the estimate only,
        not the per-size samples batch sizing compares."""
        per_rows = self.table.setdefault(shape, {})
        old = per_rows.get(rows)
        per_rows[rows] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        if reference:
            self.recent.setdefault(shape, {}).setdefault(rows, deque(maxlen=self.window)).append(seconds)

    def calibrate(self, shape: Hashable, seconds_by_rows: Mapping[int, float]) -> None:
        """Install a deliberately measured curve (each point timed alike, e.g. interleaved minima)."""
        self.calibrated[shape] = dict(seconds_by_rows)
        for rows, seconds in seconds_by_rows.items():
            self.table.setdefault(shape, {}).setdefault(rows, seconds)

    def reference_curve(self, shape: Hashable) -> dict[int, float]:
        """Step seconds by rows that batch sizing trusts: the calibrated curve, else recent medians."""
        if shape in self.calibrated:
            return self.calibrated[shape]
        return {
            rows: statistics.median(samples)
            for rows, samples in self.recent.get(shape, {}).items()
            if len(samples) >= self.min_samples
        }

    def step_seconds(self, shape: Hashable, rows: int) -> float:
        """Estimated duration of one step of a batch of `rows` rows of `shape`."""
        rows = max(1, rows)
        per_rows = self.table.get(shape)
        base = _base_shape(shape)
        if not per_rows and base is not None:  # a variant not measured yet: like its shape
            return self.step_seconds(base, rows)
        if not per_rows:
            per_rows = self._nearest_shape_table(shape)
            if not per_rows:
                return self.default_step_s * rows
        if rows in per_rows:
            return per_rows[rows]
        known = sorted(per_rows)
        lower = [r for r in known if r < rows]
        upper = [r for r in known if r > rows]
        if lower and upper:  # interpolate linearly between the neighbours
            lo, hi = lower[-1], upper[0]
            frac = (rows - lo) / (hi - lo)
            return per_rows[lo] + frac * (per_rows[hi] - per_rows[lo])
        nearest = lower[-1] if lower else upper[0]
        # Outside what we saw: scale per row (linear extrapolation is the safe side).
        return per_rows[nearest] * rows / nearest

    def _nearest_shape_table(self, shape: Hashable) -> dict[int, float] | None:
        """For an unseen shape, scale the table of a seen shape by token count when shapes are sizes."""
        if not self.table or not isinstance(shape, tuple):
            return None
        tokens = _tokens(shape)
        if tokens is None:
            return None
        best = None
        for other, per_rows in self.table.items():
            other_tokens = _tokens(other) if isinstance(other, tuple) else None
            if other_tokens:
                ratio = tokens / other_tokens
                if best is None or abs(ratio - 1) < abs(best[0] - 1):
                    best = (ratio, per_rows)
        if best is None:
            return None
        ratio, per_rows = best
        return {r: s * ratio for r, s in per_rows.items()}

    def efficient_rows(self, shape: Hashable, min_gain: float) -> int | None:
        """The batch size (in rows) past which batching stops paying, or None if not known yet.

        Walks the *measured* points in order: once adding rows lowers the per-row cost by
        less than `min_gain`, a bigger batch only slows everyone in it for no throughput.
        Unmeasured sizes are never ruled out, so the engine keeps exploring them.
        """
        per_rows = self.reference_curve(shape)
        if not per_rows:
            return None
        known = sorted(per_rows)
        for small, big in zip(known, known[1:], strict=False):
            if per_rows[big] / big > (1.0 - min_gain) * per_rows[small] / small:
                return small
        return None

    def service_seconds(self, shape: Hashable, rows: int, steps: int, batch_rows: int | None = None) -> float:
        """Time for `steps` more steps of a request with `rows` rows, in a batch of `batch_rows`."""
        return steps * self.step_seconds(shape, batch_rows or rows)


def _tokens(shape: tuple) -> int | None:
    nums = [d for d in shape if isinstance(d, int)]
    if len(nums) < 2:
        return None
    return nums[-1] * nums[-2]
