"""The backbone seam: what a denoising step needs from a model family, and nothing else.

The runner (`serving.runner`) batches requests, applies classifier-free guidance and steps
each request's own scheduler; everything family-specific sits behind `Backbone`:

- how a request's prompt(s) become the denoiser's conditioning (`encode_prompt`): SD 1.x
  has one CLIP encoder, SDXL two plus pooled embeddings and per-request size/crop ids;
- the batched denoiser call with a per-sample timestep tensor (`denoise`);
- the latent layout for a size (`latent_shape`), and the VAE (`encode_image`, `decode`);
- what the family can do (`Capabilities`): masked compute for edits, guidance,
  prediction type.

Conditioning is a dict of tensors keyed by the denoiser's argument names, each with one
row per image, so the runner can concatenate any requests' conditioning along rows without
knowing what the keys mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from stepfleet.serving.contracts import Shape
from stepfleet.serving.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    from diffusers import SchedulerMixin
    from PIL import Image

#: Tensors keyed by the denoiser call's argument names, one row per image.
CondTensors = dict[str, torch.Tensor]
#: Extra keyword arguments of one batched denoiser call that extensions supply (ControlNet's
#: `down_block_additional_residuals` list and `mid_block_additional_residual`), one row per
#: batch row like the sample: the backbone passes them through without knowing what they are.
DenoiserExtras = dict[str, torch.Tensor | list[torch.Tensor]]


@dataclass(frozen=True)
class Capabilities:
    """What a backbone's model can do; the worker checks requests against it."""

    #: Edits on cached template activations (`serving.edits.masked_unet`) are possible.
    masked_compute: bool
    #: Classifier-free guidance by a second, negative-prompt row per image.
    guidance: bool
    #: What the denoiser predicts (`epsilon`, `v_prediction`, `sample`); the scheduler reads
    #: it from its config, so it is informational here.
    prediction_type: str


@dataclass(frozen=True)
class Conditioning:
    """One request's conditioning: positive rows, and negative rows when guidance is on."""

    positive: CondTensors
    negative: CondTensors | None

    @property
    def guided(self) -> bool:
        return self.negative is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.positive.values())).dtype


class Backbone(Protocol):
    """One model family's components behind the operations a denoising step needs."""

    family: str
    capabilities: Capabilities
    #: The denoiser module (UNet or transformer) that extensions hook into.
    denoiser: torch.nn.Module
    #: The checkpoint's own scheduler: its class and config seed every request's scheduler.
    scheduler: SchedulerMixin
    default_size: tuple[int, int]  # (width, height)

    @property
    def device(self) -> torch.device: ...

    def latent_shape(self, width: int, height: int) -> Shape: ...

    def encode_prompt(self, params: GenerationParams, guidance: bool) -> Conditioning:
        """Encode `params.n` images' worth of conditioning (`negative` set iff `guidance`)."""
        ...

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                extras: DenoiserExtras | None = None) -> torch.Tensor:
        """One batched denoiser call: (B, C, h, w) latents, (B,) timesteps, conditioning rows, and the
        extensions' extra inputs (`extras`, passed to the denoiser as keyword arguments)."""
        ...

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """An RGB image → (1, C, h, w) scaled latents (the distribution's mode: deterministic)."""
        ...

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """Scaled latents → images as the family's pipeline post-processes them."""
        ...


@runtime_checkable
class SetsTimesteps(Protocol):
    """A backbone whose schedule depends on more than the step count.

    Flow-matching families shift their sigmas by the image's token count (`calculate_shift`'s
    `mu`) and Flux passes its own sigmas; the runner asks such a backbone to set a new request's
    timesteps instead of calling `scheduler.set_timesteps(steps)` itself, and stays
    family-agnostic. Backbones without this method get the plain call.
    """

    def set_timesteps(self, scheduler: SchedulerMixin, steps: int, shape: Shape) -> None:
        """Set `scheduler`'s timesteps for `steps` steps on latents of `shape` (C, h, w), as the
        family's pipeline does."""
        ...


@runtime_checkable
class MakesVideo(Protocol):
    """A video family (Wan): its latents have a frame axis, (C, F, h, w).

    The runner asks it for a request's latent shape with the request's `num_frames` (None: one
    frame, an image), so video and image requests of one model each get their own shape group;
    image families lack this method and keep `latent_shape(width, height)`.
    """

    def video_latent_shape(self, width: int, height: int, num_frames: int) -> Shape:
        """(C, F, h, w) latents for `num_frames` frames of `width`×`height`."""
        ...
