"""How long a denoising step takes, learned online; used for batch sizing, slack, Retry-After and load.

Pure and clock-free: the engine feeds it measured step durations stamped with its own clock,
the planner and the benchmark's replay ask it for estimates. A step's cost depends on the
latent shape (tokens), on a cost variant (cached edits compute fewer tokens) and on how many
rows run together (batching is sub-linear), so the model keeps one estimate per
(shape, variant, rows) and interpolates between the rows it has seen.

Why robust statistics and not a running average. The worker shares its machine: another
process that takes the core for a while makes single steps 3–10× slower. A running average
moves a long way on one such step and, worse, batch sizing compares the costs of different
batch sizes, so one poisoned point makes batching look useless (or wonderful). Each point
therefore keeps a short window of recent samples and answers with their median: a single
descheduled step moves it by one rank, while a real change of speed (a noisy neighbour
arriving or leaving) holds more than half of the window within a few steps — well under a
second at typical step times — and is followed.

Why the calibration only seeds. A curve timed once after warm-up (`Engine.calibrate`) compares
every size alike, which online samples of rarely-run sizes cannot — but it is one moment of a
drifting machine: timed under interference it once said "one or two images per step" for the
rest of the worker's life. Now measured points take over from the seeds as soon as they have
`min_samples` fresh samples, and seeds of sizes the engine does not run are scaled by the
drift the measured sizes show against their own seeds, so a curve half measured now and half
timed at start-up still compares like with like.

Old data decays. Samples older than `max_age_s` behind the newest observation no longer count
as fresh; a point without fresh samples falls back to its seed (times the drift) or, for a shape
never calibrated, to the median of its last samples — stale, but the best evidence there is.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field


def cost_key(shape: Hashable, variant: str | None = None) -> Hashable:
    """What step costs are learned under: the latent shape, plus a variant whose steps cost
    differently at the same shape (edits on cached template activations compute only their
    masked tokens, and on a CPU batching them costs more per image than it saves)."""
    return shape if variant is None else (shape, variant)


def key_label(key: Hashable) -> str:
    """A cost key as a metric label or JSON key: `4x32x32`, `4x32x32/cached-edit`."""
    base = _base_shape(key)
    if base is not None:
        return f"{key_label(base)}/{key[1]}"  # type: ignore[index]
    if isinstance(key, tuple):
        return "x".join(str(d) for d in key)
    return str(key)


def _base_shape(key: Hashable) -> Hashable | None:
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str):
        return key[0]
    return None


@dataclass(frozen=True)
class _Sample:
    at: float  # the engine's clock when the step ended
    seconds: float
    reference: bool  # a batch of one cost variant only (what batch sizing may compare)


@dataclass
class _Point:
    """Everything known about one (key, rows): recent samples and the calibration's seed."""

    samples: deque[_Sample]
    seed: float | None = None


@dataclass
class StepCostModel:
    """Robust step seconds per (cost key, UNet rows), learned online and seeded by calibration."""

    #: Used before anything was measured for a shape: a pessimistic guess beats zero.
    default_step_s: float = 0.05
    #: Samples kept per (key, rows). The median of 15 ignores up to 7 slow steps in a row, and
    #: a shift of speed takes over after 8 steps.
    window: int = 15
    #: Samples older than this (behind the newest observation of any key) no longer count as
    #: fresh: a neighbour that left a minute ago says nothing about now.
    max_age_s: float = 20.0
    #: Fresh samples a point needs before its own median replaces its seed (or, unseeded, before
    #: batch sizing trusts it): one or two first runs of a new size are often slow.
    min_samples: int = 3
    points: dict[Hashable, dict[int, _Point]] = field(default_factory=dict)
    #: The newest observation's time: "now" for ageing, so queries need no clock.
    newest: float = 0.0
    #: Curves computed since the last observation (the planner asks for them many times a step).
    _memo: dict[tuple[Hashable, bool, int, bool], dict[int, float]] = field(default_factory=dict, repr=False)

    # -- learning --------------------------------------------------------------------
    def observe(self, key: Hashable, rows: int, seconds: float, reference: bool = True,
                at: float | None = None) -> None:
        """Record one step of `rows` UNet rows that took `seconds`, ending at `at` (engine clock).

        `reference=False` (a batch mixing cost variants) feeds the estimate only, not the
        curve batch sizing compares. Without `at` the sample counts as taken at the newest time.
        """
        when = self.newest if at is None else at
        self.newest = max(self.newest, when)
        self._point(key, rows).samples.append(_Sample(when, seconds, reference))
        self._memo.clear()

    def calibrate(self, key: Hashable, seconds_by_rows: Mapping[int, float]) -> None:
        """Seed the curve with a deliberately timed one (each size timed alike, e.g. interleaved minima)."""
        for rows, seconds in seconds_by_rows.items():
            self._point(key, rows).seed = seconds
        self._memo.clear()

    def _point(self, key: Hashable, rows: int) -> _Point:
        per_rows = self.points.setdefault(key, {})
        if rows not in per_rows:
            per_rows[rows] = _Point(deque(maxlen=self.window))
        return per_rows[rows]

    # -- what is known -----------------------------------------------------------------
    def keys(self) -> Iterator[Hashable]:
        return iter(self.points)

    def seeds(self, key: Hashable) -> dict[int, float]:
        """The calibration's curve for `key` (empty if never calibrated)."""
        return {r: p.seed for r, p in self.points.get(key, {}).items() if p.seed is not None}

    def _fresh(self, point: _Point, reference_only: bool) -> list[float]:
        horizon = self.newest - self.max_age_s
        return [s.seconds for s in point.samples if s.at >= horizon and (s.reference or not reference_only)]

    def drift(self, key: Hashable) -> float:
        """How much slower (>1) or faster (<1) the seeded sizes run now than when calibrated.

        The median ratio of fresh medians to seeds over the sizes that have both; 1 when none do.
        """
        ratios = []
        for point in self.points.get(key, {}).values():
            fresh = self._fresh(point, reference_only=True)
            if point.seed and len(fresh) >= self.min_samples:
                ratios.append(statistics.median(fresh) / point.seed)
        return statistics.median(ratios) if ratios else 1.0

    def _curve(self, key: Hashable, reference_only: bool, need: int, fresh_only: bool = False) -> dict[int, float]:
        """Seconds by rows: fresh medians, else seeds scaled by drift, else stale medians (memoised).

        `fresh_only`: only the points measured lately (no seeds, no stale medians).
        """
        memo_key = (key, reference_only, need, fresh_only)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._compute_curve(key, reference_only, need, fresh_only)
        return self._memo[memo_key]

    def _compute_curve(self, key: Hashable, reference_only: bool, need: int, fresh_only: bool) -> dict[int, float]:
        per_rows = self.points.get(key, {})
        drift: float | None = None
        out: dict[int, float] = {}
        for rows, point in per_rows.items():
            fresh = self._fresh(point, reference_only)
            if len(fresh) >= self.min_samples:
                out[rows] = statistics.median(fresh)
                continue
            if fresh_only:
                continue
            if point.seed is not None:
                if drift is None:
                    drift = self.drift(key)
                out[rows] = point.seed * drift
                continue
            known = fresh or [s.seconds for s in point.samples if s.reference or not reference_only]
            if len(known) >= need:
                out[rows] = statistics.median(known)
        return out

    def reference_curve(self, key: Hashable) -> dict[int, float]:
        """Step seconds by rows that batch sizing compares (single-variant batches only)."""
        return dict(self._curve(key, reference_only=True, need=self.min_samples))

    def estimate_curve(self, key: Hashable) -> dict[int, float]:
        """Step seconds by rows for estimates (deadlines, backlog): every sample counts."""
        return dict(self._curve(key, reference_only=False, need=1))

    # -- estimates -----------------------------------------------------------------------
    def step_seconds(self, key: Hashable, rows: int) -> float:
        """Estimated duration of one step of a batch of `rows` rows of `key`."""
        rows = max(1, rows)
        per_rows = self._curve(key, reference_only=False, need=1)
        base = _base_shape(key)
        if not per_rows and base is not None:  # a variant not measured yet: like its shape
            return self.step_seconds(base, rows)
        if not per_rows:
            per_rows = self._nearest_shape_curve(key)
            if not per_rows:
                return self.default_step_s * rows
        return _interpolate(per_rows, rows)

    def _nearest_shape_curve(self, shape: Hashable) -> dict[int, float] | None:
        """For an unseen shape, scale the curve of a seen shape by token count when shapes are sizes."""
        if not isinstance(shape, tuple):
            return None
        tokens = _tokens(shape)
        if tokens is None:
            return None
        best: tuple[float, Hashable] | None = None
        for other in self.points:
            other_tokens = _tokens(other) if isinstance(other, tuple) else None
            if other_tokens:
                ratio = tokens / other_tokens
                if best is None or abs(ratio - 1) < abs(best[0] - 1):
                    best = (ratio, other)
        if best is None:
            return None
        ratio, other = best
        return {r: s * ratio for r, s in self.estimate_curve(other).items()} or None

    def efficient_rows(self, key: Hashable, min_gain: float) -> int | None:
        """The batch size (in rows) past which batching stops paying, or None if not known yet.

        Walks the compared points in order: once adding rows lowers the per-row cost by
        less than `min_gain`, a bigger batch only slows everyone in it for little throughput.
        Unmeasured sizes are never ruled out, so the engine keeps exploring them.
        """
        per_rows = self._curve(key, reference_only=True, need=self.min_samples)
        known = sorted(per_rows)
        for small, big in zip(known, known[1:], strict=False):
            if per_rows[big] / big > (1.0 - min_gain) * per_rows[small] / small:
                return small
        return None

    def best_throughput_rows(self, key: Hashable, min_gain: float = 0.0) -> int | None:
        """The smallest batch (in rows) that no bigger one beats per row by more than `min_gain`.

        Unlike `efficient_rows`, a flat stretch in the middle of the curve does not stop the
        search: under a backlog every throughput gain counts, wherever the curve offers it.
        Only sizes measured lately compare: a seed or a stale median that says a bigger batch
        does not pay is not believed until that batch has run again — else a calibration timed
        under interference ("batching is useless") would cap every backlog for good, since
        nothing would ever run the bigger size to refute it. Measured sizes age out after
        `max_age_s`, so a backlog re-tries bigger batches that often. None when the biggest
        measured size is the best (or nothing is measured): explore upward.
        """
        per_rows = self._curve(key, reference_only=True, need=self.min_samples, fresh_only=True)
        known = sorted(per_rows)
        for i, small in enumerate(known[:-1]):
            per_small = per_rows[small] / small
            if all(per_rows[big] / big >= (1.0 - min_gain) * per_small for big in known[i + 1:]):
                return small
        return None

    def service_seconds(self, key: Hashable, rows: int, steps: int, batch_rows: int | None = None) -> float:
        """Time for `steps` more steps of a request with `rows` rows, in a batch of `batch_rows`."""
        return steps * self.step_seconds(key, batch_rows or rows)


def _interpolate(per_rows: Mapping[int, float], rows: int) -> float:
    if rows in per_rows:
        return per_rows[rows]
    known = sorted(per_rows)
    lower = [r for r in known if r < rows]
    upper = [r for r in known if r > rows]
    if lower and upper:  # linearly between the neighbours
        lo, hi = lower[-1], upper[0]
        frac = (rows - lo) / (hi - lo)
        return per_rows[lo] + frac * (per_rows[hi] - per_rows[lo])
    nearest = lower[-1] if lower else upper[0]
    # Outside what we saw: scale per row (linear extrapolation is the safe side).
    return per_rows[nearest] * rows / nearest


def _tokens(shape: tuple) -> int | None:
    """Latent positions a step computes: h x w, times the frames of a video's (C, F, h, w)."""
    nums = [d for d in shape if isinstance(d, int)]
    if len(nums) < 2:
        return None
    return math.prod(nums[1:]) if len(nums) >= 4 else nums[-1] * nums[-2]
