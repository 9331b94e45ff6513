"""Demand: the arrival-rate trend from recent samples, and the rate to plan for.

Replicas asked for now serve only after the provisioning delay (model loads take minutes),
so the loop plans for the demand it expects then: the current rate, raised along a rising
trend for one provisioning delay plus one interval, never lowered along a falling one (a
falling forecast would save little and scale-down waits for stabilization anyway).

Observers (the simulator, the operator's Prometheus reader) keep the last few interval
rates and call `estimate_demand`: the rate is the fitted line's value now, which halves the
Poisson noise of a single interval (noise the scale-down window would otherwise pick up as
phantom peaks), unless the last interval jumped more than three standard deviations of that
noise away from the line — then the demand shifted, the last rate is taken as it is and the
fit restarts from it. The policy only sees the rate and its slope.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def planning_rate(rate_rps: float, trend_rps_per_s: float, lookahead_s: float,
                  headroom: float) -> float:
    """The demand to provision for: rate raised along a rising trend, plus headroom."""
    ahead = rate_rps + max(0.0, trend_rps_per_s) * max(0.0, lookahead_s)
    return max(0.0, ahead) * (1.0 + max(0.0, headroom))


def estimate_demand(samples: Sequence[tuple[float, float]], interval_s: float
                    ) -> tuple[float, float, tuple[tuple[float, float], ...]]:
    """(rate, trend, samples to keep) from interval rates, oldest first.

    A level shift (the last rate more than three Poisson standard deviations from the
    fitted line) returns the last rate with no trend, and keeps only the last sample.
    """
    if not samples:
        return 0.0, 0.0, ()
    level, slope = fit_trend(samples)
    last = samples[-1][1]
    sigma = math.sqrt(max(last, level, 0.0) / max(interval_s, 1e-9))
    if len(samples) >= 3 and abs(last - level) > 3.0 * sigma + 1e-9:
        return max(0.0, last), 0.0, (samples[-1],)
    return max(0.0, level), slope, tuple(samples)
