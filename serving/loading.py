"""Load a diffusers pipeline the way real weights are loaded: `from_pretrained`, from disk or hub.

Built-in names (`tiny-sd`) are materialised to a local directory first and then take the
same `from_pretrained` path, so tests exercise exactly what production runs. Offline use
is honoured: `local_files_only=True` (or HF_HUB_OFFLINE=1) never touches the network.

The family is checked against the checkpoint before its weights load where the checkpoint
is on disk (its `model_index.json` names the pipeline class), and against the loaded
pipeline otherwise: a DiffusionService that says `family: sdxl` over an SD 1.5 checkpoint
fails with `FamilyMismatch` naming both, instead of being served as something else.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepfleet.serving.backbones import resolve_family
from stepfleet.serving.backends import Backend, resolve_backend, torch_device
from stepfleet.serving.builtin_models import BUILTIN_MODELS, ensure_builtin

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A pipeline on its device, and the family it is served as (`serving.backbones`)."""

    name: str
    source: str
    pipeline: Any  # a diffusers DiffusionPipeline of `family`; `backbones.load_backbone` wraps it
    backend: Backend
    family: str


def quiet_libraries() -> None:
    """Silence progress bars and the torchvision fallback notice: a server logs, it doesn't draw."""
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def resolve_source(model: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """Map a model argument to (path or hub id, is_local)."""
    if model in BUILTIN_MODELS:
        return str(ensure_builtin(model, cache_dir)), True
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser()), True
    return model, False


def vae_channels_last(pipe: Any) -> None:
    """Keep an image VAE's weights channels-last on the CPU: oneDNN's convolutions then run NHWC.

    Why: the VAE decode is most of a cached edit on the CPU (issue 12), and channels-last weights
    make it 30-36 % faster (min of 3, 2 threads: tiny-sd 512² 0.194 → 0.125 s, tiny-sd3 1024² 1.49 →
    1.04 s; outputs within 7e-4 of the NCHW decode, float rounding of another convolution
    algorithm). Everything that decodes shares the module (diffusers' own pipelines included), so
    every path gets it alike. Video VAEs (3-D convolutions) keep their layout.
    """
    import torch
    from diffusers import AutoencoderKL

    vae = getattr(pipe, "vae", None)
    if isinstance(vae, AutoencoderKL):
        vae.to(memory_format=torch.channels_last)


def load_model(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    family: str = "auto",
) -> LoadedModel:
    """Load `model` (built-in name, local directory or hub id) onto the chosen backend.

    `family` is `auto` (the checkpoint's own) or one of `backbones.FAMILIES`; a checkpoint of
    another family raises `backbones.FamilyMismatch`.
    """
    import torch
    from diffusers import DiffusionPipeline

    quiet_libraries()
    backend = resolve_backend(device, dtype)
    source, is_local = resolve_source(model, cache_dir)
    offline = local_files_only
    if offline is None:
        offline = is_local or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, backend.dtype),
        "local_files_only": offline,
        "safety_checker": None,
        "requires_safety_checker": False,
    }
    if revision:
        kwargs["revision"] = revision
    index = Path(source) / "model_index.json"
    if is_local and index.is_file():  # refuse a wrong family before loading gigabytes of weights
        entries = json.loads(index.read_text())
        resolve_family(family, entries.get("_class_name", "?"), model)
        # Components saved as absent ([null, null], e.g. SD3 without its optional T5) load as absent:
        # `from_pretrained` otherwise refuses a pipeline that lacks an expected component.
        kwargs.update({k: None for k, v in entries.items() if v == [None, None] and k not in kwargs})
    log.info("loading %s from %s on %s (%s)", model, source, backend.name, backend.dtype)
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    served = resolve_family(family, type(pipe).__name__, model)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(torch_device(backend))
    for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).eval()
    if backend.name == "cpu":
        vae_channels_last(pipe)
    return LoadedModel(name=model, source=source, pipeline=pipe, backend=backend, family=served)
