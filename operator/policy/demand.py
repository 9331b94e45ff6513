"""Demand: the arrival rate and its trend from recent samples, and the rate to plan for.

Replicas asked for now serve only after the provisioning delay (model loads take minutes),
so the loop plans for the demand it expects then: the current rate, raised along a rising
trend for one provisioning delay plus one interval, never lowered along a falling one (a
falling forecast would save little and scale-down waits for stabilization anyway).

Observers (the simulator, the operator's Prometheus reader) keep the last few interval
rates, each stamped at the middle of its interval, and call `estimate_demand`. Three
things make the estimate both calm and quick:

- The rate is a line fitted through the last quarter hour, read at `now`: it halves the
  Poisson noise of a single interval, noise the scale-down window would otherwise pick up
  as phantom peaks (and pay for, in whole replicas). If the last interval alone is higher
  than the line by more than twice its Poisson noise, the rate is that interval's (less
  the noise): a rise shows at once, noise almost never does.
- A long line lags a ramp that steepens (the morning side of a day). The slope of the last
  four samples is used instead when it is steeper by more than three times its own
  standard error — so noise almost never makes it win, but real acceleration does. Only
  upwards: scale up fast, scale down slowly.
- A step (a sample off the line by more than 10 % and by more than three times both the
  Poisson noise and the line's own scatter) restarts the fit from the new level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Samples in the short fit that catches a steepening ramp.
SHORT_SAMPLES = 4
#: Samples needed before a jump may count as a step (fewer fit any curve too tightly).
STEP_SAMPLES = 6


def fit_trend(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through (time_s, rate_rps) samples.

    Returns (rate at the last sample's time, slope in rps per second). One sample gives a
    flat line; no samples give (0, 0).
    """
    if not samples:
        return 0.0, 0.0
    if len(samples) == 1:
        return samples[0][1], 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    if var_t <= 0:
        return mean_r, 0.0
    slope = sum((t - mean_t) * (r - mean_r) for t, r in samples) / var_t
    last_t = samples[-1][0]
    return mean_r + slope * (last_t - mean_t), slope


def _spread(samples: Sequence[tuple[float, float]]) -> float:
    """Sum of squared time deviations (what a slope's standard error divides by)."""
    mean_t = sum(t for t, _ in samples) / len(samples)
    return sum((t - mean_t) ** 2 for t, _ in samples)


@dataclass(frozen=True)
class DemandEstimate:
    rate_rps: float
    trend_rps_per_s: float
    #: Samples to keep for the next estimate (a step drops the old ones).
    samples: tuple[tuple[float, float], ...]
    #: Which rule decided: "line", "ramp" (short slope), "rise" (last interval) or "step".
    basis: str


def estimate_demand(samples: Sequence[tuple[float, float]], interval_s: float,
                    now_s: float | None = None) -> DemandEstimate:
    """Rate at `now_s` (default: the last sample's time) and trend from interval rates.

    `samples` are (time_s, rate_rps), oldest first, each rate measured over `interval_s`
    and stamped at the middle of its interval.
    """
    if not samples:
        return DemandEstimate(0.0, 0.0, (), "line")
    last_t, last = samples[-1]
    now = last_t if now_s is None else now_s
    window = max(interval_s, 1e-9)
    if len(samples) >= STEP_SAMPLES:
        earlier = samples[:-1]
        e_level, e_slope = fit_trend(earlier)
        e_t = earlier[-1][0]
        expected = e_level + e_slope * (last_t - e_t)
        scatter = math.sqrt(sum((r - (e_level + e_slope * (t - e_t))) ** 2
                                for t, r in earlier) / len(earlier))
        sigma = math.sqrt(max(last, expected, 0.0) / window)
        jump = abs(last - expected)
        if jump > 3.0 * max(sigma, scatter) and jump > 0.1 * max(expected, 0.0):
            return DemandEstimate(max(0.0, last), 0.0, (samples[-1],), "step")

    level, slope = fit_trend(samples)
    basis = "line"
    if len(samples) > SHORT_SAMPLES:
        recent = samples[-SHORT_SAMPLES:]
        r_level, r_slope = fit_trend(recent)
        sigma = math.sqrt(max(r_level, 0.0) / window)
        standard_error = sigma / math.sqrt(_spread(recent))
        if r_slope - 3.0 * standard_error > slope:
            level, slope, basis = r_level, r_slope, "ramp"
    rate = level + slope * (now - last_t)
    raised = last + max(0.0, slope) * (now - last_t) - 2.0 * math.sqrt(max(last, 0.0) / window)
    if raised > rate:
        rate, basis = raised, "rise"
    return DemandEstimate(max(0.0, rate), slope, tuple(samples), basis)


def planning_rate(rate_rps: float, trend_rps_per_s: float, lookahead_s: float,
                  headroom: float) -> float:
    """The demand to provision for: rate raised along a rising trend, plus headroom."""
    ahead = rate_rps + max(0.0, trend_rps_per_s) * max(0.0, lookahead_s)
    return max(0.0, ahead) * (1.0 + max(0.0, headroom))
