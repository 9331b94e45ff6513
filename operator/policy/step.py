"""One control step: memory + signals + spec + now -> plan. Shared by every loop.

The kopf timer, `stepfleet up` and the simulator each measure their world differently
(Prometheus or scraped counters, local processes, a request log), but from a measured
interval rate and per-pool observations on, the step is the same: fit the demand over the
recent samples, call `decide`, remember. Writing it once here is what makes the
simulator's figures the operator's behaviour — before, each loop kept its own sample
window and its own copy of this code, and they drifted.

Pure like `decide`: no clock (the time comes in), no I/O, nothing mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .decide import decide
from .demand import estimate_demand
from .kinds import video_share
from .model import Observation, Plan, PolicySpec, PolicyState, PoolObservation

#: Interval rates the demand trend is fitted over (a quarter hour at one-minute intervals).
TREND_SAMPLES = 15


@dataclass(frozen=True)
class StepMemory:
    """What a loop carries from one step to the next; start with `StepMemory()`."""

    state: PolicyState = field(default_factory=PolicyState)
    #: (time_s, rate_rps) interval rates, oldest first, at most TREND_SAMPLES.
    samples: tuple[tuple[float, float], ...] = ()
    #: The last plan and the demand estimate it was made for.
    plan: Plan | None = None
    demand_rps: float = 0.0
    #: (time_s, video_rps) interval rates at the same times as `samples` (videos among them).
    video_samples: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Signals:
    """What one loop measured this interval.

    `arrival_rps` is the request rate over the last `window_s` seconds (None: nothing
    measured yet, e.g. the first scrape, whose counters need a second one to give a rate);
    `pools` the per-pool replicas, latency, queue and capacity signals.
    """

    arrival_rps: float | None
    window_s: float
    pools: tuple[PoolObservation, ...] = ()
    #: Video jobs per second among `arrival_rps` (0: images only).
    video_rps: float = 0.0


def control_step(memory: StepMemory, signals: Signals, spec: PolicySpec,
                 now_s: float) -> tuple[Plan | None, StepMemory]:
    """The plan for now (None until a rate was measured) and the memory for the next step."""
    if signals.arrival_rps is None or signals.window_s <= 0:
        return None, memory
    sample = (now_s - signals.window_s / 2.0, max(0.0, signals.arrival_rps))
    estimate = estimate_demand([*memory.samples, sample][-TREND_SAMPLES:], signals.window_s, now_s)
    kept = tuple(estimate.samples)[-TREND_SAMPLES:]
    times = {t for t, _ in kept}
    videos = tuple((t, r) for t, r in (*memory.video_samples, (sample[0], max(0.0, signals.video_rps)))
                   if t in times)
    observation = Observation(now_s=now_s, arrival_rps=estimate.rate_rps,
                              arrival_trend_rps_per_s=estimate.trend_rps_per_s,
                              pools=signals.pools, video_share=video_share(kept, videos))
    plan, state = decide(observation, memory.state, spec)
    return plan, StepMemory(state=state, samples=kept, plan=plan, demand_rps=estimate.rate_rps,
                            video_samples=videos)
