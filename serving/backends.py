"""Which device a worker computes on, chosen from what the machine can actually import.

The operator maps accelerator types to these names (DESIGN.md): nvidia-gpu → cuda,
aws-neuron → neuron, google-tpu → xla, cpu → cpu. `auto` picks the first that works so
one image runs anywhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

BACKENDS: tuple[str, ...] = ("cuda", "neuron", "xla", "cpu")


@dataclass(frozen=True)
class Backend:
    name: str  # one of BACKENDS
    device: str  # what torch calls it ("cuda", "xla", "cpu"; Neuron runs through XLA)
    dtype: str  # "float32", "float16" or "bfloat16"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends this process can use, in preference order."""
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if _importable("torch_neuronx"):
        found.append("neuron")
    if _importable("torch_xla"):
        found.append("xla")
    found.append("cpu")
    return found


def default_dtype(backend: str) -> str:
    """Half precision where the hardware is built for it; float32 on CPU for exactness."""
    return {"cuda": "float16", "neuron": "bfloat16", "xla": "bfloat16"}.get(backend, "float32")


def resolve_backend(requested: str = "auto", dtype: str = "auto") -> Backend:
    """Turn `--device`/`--dtype` into a concrete backend, failing clearly if it is unavailable."""
    available = available_backends()
    if requested == "auto":
        name = available[0]
    elif requested not in BACKENDS:
        raise ValueError(f"unknown device {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
    elif requested not in available:
        raise RuntimeError(f"device {requested!r} is not available here (available: {', '.join(available)})")
    else:
        name = requested
    device = {"cuda": "cuda", "neuron": "xla", "xla": "xla", "cpu": "cpu"}[name]
    chosen = default_dtype(name) if dtype == "auto" else dtype
    if chosen not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return Backend(name=name, device=device, dtype=chosen)


def torch_device(backend: Backend):  # -> torch.device
    """The torch device object; XLA devices come from torch_xla."""
    import torch

    if backend.device == "xla":
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]

        return xm.xla_device()
    return torch.device(backend.device)


def step_boundary(device_type: str) -> None:
    """End a denoising step on a lazy (XLA) device: cut and run the graph traced since the last one.

    torch-xla records operations lazily; without a cut per step, the scheduler updates of every
    step would pile into one growing graph (a new compile each step). On TPU and on Neuron (whose
    PyTorch support is torch-xla) the runner calls this after each batched step; elsewhere it is
    a no-op. (The compiled denoiser itself runs through torch.compile's `openxla` backend.)
    """
    if device_type != "xla":
        return
    import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]

    xm.mark_step()
