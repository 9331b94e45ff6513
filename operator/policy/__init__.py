"""The cost/capacity policy: a pure `decide(observation, state, spec) -> (plan, state)`.

Imports neither Kubernetes nor torch nor kopf, reads no clock: dataclasses in, dataclasses
out. See `decide` for the steps, `model` for the data, and `step.control_step` for the one
control step (demand fit + decide) that the kopf timer, `stepfleet up` and the simulator share.
"""

from .decide import decide
from .demand import fit_trend, planning_rate
from .model import (
    ControlSettings,
    Observation,
    Plan,
    PolicySpec,
    PolicyState,
    PoolObservation,
    PoolPlan,
    PoolSpec,
    SloSpec,
)
from .step import TREND_SAMPLES, Signals, StepMemory, control_step

__all__ = [
    "ControlSettings",
    "Observation",
    "Plan",
    "PolicySpec",
    "PolicyState",
    "PoolObservation",
    "PoolPlan",
    "PoolSpec",
    "Signals",
    "SloSpec",
    "StepMemory",
    "TREND_SAMPLES",
    "control_step",
    "decide",
    "fit_trend",
    "planning_rate",
]
