"""Offered load: the rate curve of a scenario, and the request arrival times drawn from it.

Arrivals are a non-homogeneous Poisson process: the rate is evaluated at the middle of each
one-second bin, the bin's count drawn from a Poisson law and its arrivals placed uniformly
inside it. Generated with numpy in one pass, so a million arrivals cost milliseconds, and
from one seeded generator, so every policy in a run sees exactly the same requests.
"""

from __future__ import annotations

import numpy as np

from .scenario import ConstantLoad, CosineLoad, Scenario, StepsLoad, TraceLoad


def rate_at(scenario: Scenario, times_s: np.ndarray) -> np.ndarray:
    """The offered rate (rps) at each time."""
    load = scenario.load
    t = np.asarray(times_s, dtype=float)
    if isinstance(load, ConstantLoad):
        return np.full_like(t, load.rps)
    if isinstance(load, CosineLoad):
        phase = 2.0 * np.pi * (t + load.phase_s) / load.period_s
        return load.base_rps + (load.peak_rps - load.base_rps) * (1.0 - np.cos(phase)) / 2.0
    if isinstance(load, StepsLoad):
        steps = sorted(load.steps, key=lambda s: s.at_s)
        starts = np.array([s.at_s for s in steps])
        rates = np.array([s.rps for s in steps])
        index = np.searchsorted(starts, t, side="right") - 1
        return np.where(index >= 0, rates[np.clip(index, 0, None)], 0.0)
    if isinstance(load, TraceLoad):
        points = scenario.trace_points()
        xs = np.array([p[0] for p in points])
        ys = np.array([p[1] for p in points])
        return np.interp(t, xs, ys)
    raise TypeError(f"unknown load {load!r}")  # pragma: no cover


def rate_grid(scenario: Scenario, step_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Bin starts and the rate at each bin's middle, covering the whole run."""
    starts = np.arange(0.0, scenario.duration_s, step_s)
    return starts, np.maximum(rate_at(scenario, starts + step_s / 2.0), 0.0)


def peak_rate(scenario: Scenario) -> float:
    _, rates = rate_grid(scenario)
    return float(rates.max()) if rates.size else 0.0


def arrivals(scenario: Scenario, rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival times (seconds) of every request in the run."""
    starts, rates = rate_grid(scenario)
    widths = np.minimum(1.0, scenario.duration_s - starts)
    counts = rng.poisson(rates * widths)
    times = np.repeat(starts, counts) + rng.random(int(counts.sum())) * np.repeat(widths, counts)
    times.sort()
    return times
