"""Sampler names → diffusers scheduler instances, one fresh instance per request.

Schedulers keep per-run state (`_step_index`, multistep history), so sharing one between
requests would corrupt both; every request gets its own, configured from the model's.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from stepfleet.serving.params import SCHEDULERS


def scheduler_class(name: str) -> type:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    classes = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_a": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
        "lcm": LCMScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return classes[name]


def make_scheduler(name: str | None, base_config: Any, base_class: type) -> Any:
    """A new scheduler for one request; None means the model's own scheduler class."""
    cls = base_class if name is None else scheduler_class(name)
    overrides = {}
    if name == "dpmpp_2m":
        overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    return cls.from_config(base_config, **overrides)


@cache
def step_kwargs_for(cls: type) -> frozenset[str]:
    """Which of (eta, generator) this scheduler's `step` accepts, as the pipeline checks."""
    params = set(inspect.signature(cls.step).parameters)
    return frozenset(k for k in ("eta", "generator") if k in params)
