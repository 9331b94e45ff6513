"""Sampler names → diffusers scheduler instances, one fresh instance per request.

Schedulers keep per-run state (`_step_index`, multistep history), so sharing one between
requests would corrupt both; every request gets its own, configured from the model's.

Two kinds exist and never mix: the noise-prediction schedulers of the SD/SDXL UNets (`ddim`,
`euler`, ...) and the flow-matching ones of the DiT families (`flow_euler`, `flow_heun`):
a DDIM built from a flow-matching config (or the reverse) runs without an error and draws
noise, so `make_scheduler` refuses a name of the other kind, naming the field.
Flow-matching schedulers scale no model input and start from unit noise; `scale_model_input`
and `init_noise_sigma` below give every scheduler the same two operations.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

from stepfleet.serving.params import SCHEDULERS, InvalidParam

#: The flow-matching schedulers diffusers offers for SD3 and Flux (`FlowMatch*` classes).
FLOW_SCHEDULERS: tuple[str, ...] = ("flow_euler", "flow_heun")


def scheduler_class(name: str) -> type:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FlowMatchHeunDiscreteScheduler,
        LCMScheduler,
    )

    classes = {
        "flow_euler": FlowMatchEulerDiscreteScheduler,
        "flow_heun": FlowMatchHeunDiscreteScheduler,
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
    if name is not None and is_flow_matching(scheduler_class(name)) != is_flow_matching(base_class):
        fits = FLOW_SCHEDULERS if is_flow_matching(base_class) else tuple(n for n in SCHEDULERS
                                                                           if n not in FLOW_SCHEDULERS)
        raise InvalidParam("scheduler", f"{name!r} does not fit this model's {base_class.__name__}; "
                           f"choose one of {', '.join(fits)}", code="unsupported_value")
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


def is_flow_matching(cls: type) -> bool:
    """A flow-matching scheduler (diffusers' `FlowMatch*`: SD3, Flux), by its class."""
    return cls.__name__.startswith("FlowMatch")


def scale_model_input(scheduler: Any, sample: Any, timestep: Any) -> Any:
    """The denoiser's input for `sample` at `timestep`; flow-matching schedulers have no scaling."""
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, timestep)


def init_noise_sigma(scheduler: Any) -> Any:
    """The initial noise's scale (a float or 0-d tensor, as the scheduler has it; 1 for flow
    matching, which has no such attribute)."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def fitting_mix(base_class: type, mix: Sequence[str]) -> tuple[str, ...]:
    """The names of `mix` that fit a model whose own scheduler is `base_class`; for a
    flow-matching model, `flow_euler` alone (the benchmarks' traces count one denoiser call per
    step, and `flow_heun`, of order 2, makes two)."""
    if is_flow_matching(base_class):
        return ("flow_euler",)
    return tuple(n for n in mix if n not in FLOW_SCHEDULERS)


def add_noise(scheduler: Any, original: Any, noise: Any, timesteps: Any) -> Any:
    """`original` noised to `timesteps`, as the family's img2img/inpaint pipelines do it.

    Noise-prediction schedulers: their `add_noise`. Flow matching (SD3's and Flux's inpaint
    pipelines' `scale_noise`): sigma·noise + (1 − sigma)·original with sigma looked up by
    timestep — written out here because `scale_noise` takes the scheduler's begin index instead
    of the timestep once one is set (Flux's schedule sets it), and would noise every step alike.
    """
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(original, noise, timesteps)
    schedule = scheduler.timesteps.to(original.device)
    index = [scheduler.index_for_timestep(t, schedule) for t in timesteps.to(original.device)]
    sigma = scheduler.sigmas.to(device=original.device, dtype=original.dtype)[index].flatten()
    while sigma.ndim < original.ndim:
        sigma = sigma.unsqueeze(-1)
    return sigma * noise + (1.0 - sigma) * original
