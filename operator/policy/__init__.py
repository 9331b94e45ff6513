"""The cost/capacity policy: a pure `decide(observation, state, spec) -> (plan, state)`.

Imports neither Kubernetes nor torch nor kopf, reads no clock: dataclasses in, dataclasses
out. See `decide` for the steps and `model` for the data.
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

__all__ = [
    "ControlSettings",
    "Observation",
    "Plan",
    "PolicySpec",
    "PolicyState",
    "PoolObservation",
    "PoolPlan",
    "PoolSpec",
    "SloSpec",
    "decide",
    "fit_trend",
    "planning_rate",
]
