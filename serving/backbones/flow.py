"""What the flow-matching DiT families (SD3, Flux) share: their schedule and their VAE.

Both are trained with flow matching and served with diffusers' `FlowMatch*` schedulers, whose
sigmas may be shifted by the image's token count (`calculate_shift`: `mu` grows linearly from
`base_shift` at `base_image_seq_len` tokens to `max_shift` at `max_image_seq_len`), so a
request's schedule depends on its latent shape: `set_timesteps` (the runner's `SetsTimesteps`
hook) sets it as the family's pipeline does, and each family says which sigmas and `mu` it
passes (`schedule_kwargs`). Requests of one shape share a step batch; their timesteps differ
freely (the denoiser takes one per row).

Both have a 16-channel VAE with a `shift_factor` (latents = (mode - shift) * scale) and no
scale on the model input or the initial noise (`schedulers.scale_model_input`).
Sizes. A DiT patchifies the latents (SD3: `patch_size`, Flux: 2×2 packing), so width and height
must be multiples of the VAE factor times the patch; diffusers' SD3 pipeline refuses other sizes
and Flux's silently rounds them down (an image of another size than asked). We refuse both, as
a 400 naming `size`, when the schedule is set (`check_latent_shape`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from stepfleet.serving.backbones.base import Capabilities
from stepfleet.serving.contracts import Shape
from stepfleet.serving.params import InvalidParam

if TYPE_CHECKING:
    import numpy as np
    from diffusers import SchedulerMixin
    from PIL import Image


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """`mu` for an image of `image_seq_len` tokens: diffusers' `calculate_shift`, line for line
    (ours so that a test can check the pipelines still agree with it)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_for(config: Any, image_seq_len: int, default_max_shift: float) -> float:
    """`mu` from a scheduler config, with the defaults each pipeline passes (SD3's `max_shift`
    default is 1.16, Flux's 1.15)."""
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


class FlowBackbone:
    """A DiT denoiser (`pipe.transformer`) with a flow-matching scheduler and a shifted VAE."""

    family: str
    capabilities: Capabilities
    #: Latent pixels per token side (SD3: the transformer's patch size; Flux: 2, its packing).
    patch: int
    latent_channels: int

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        self.vae_scale_factor = int(pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def latent_shape(self, width: int, height: int) -> Shape:
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    # -- the schedule ------------------------------------------------------------------------
    def check_latent_shape(self, shape: Shape) -> None:
        _, h, w = shape
        if h % self.patch or w % self.patch:
            step = self.vae_scale_factor * self.patch
            raise InvalidParam("size", f"width and height must be multiples of {step} for this model "
                                       f"(got {w * self.vae_scale_factor}x{h * self.vae_scale_factor})")

    def tokens(self, shape: Shape) -> int:
        """Image tokens of latents of `shape`: the `image_seq_len` of the resolution shift."""
        _, h, w = shape
        return (h // self.patch) * (w // self.patch)

    def schedule_kwargs(self, scheduler: SchedulerMixin, steps: int, shape: Shape) -> dict[str, Any]:
        """The keyword arguments the family's pipeline passes to `set_timesteps` besides the device."""
        raise NotImplementedError

    def set_timesteps(self, scheduler: SchedulerMixin, steps: int, shape: Shape) -> None:
        """As the pipeline's `retrieve_timesteps`: refuses a scheduler that cannot take the family's
        sigmas or shift (the pipeline would raise too) as a 400 naming `scheduler`."""
        self.check_latent_shape(shape)
        kwargs = self.schedule_kwargs(scheduler, steps, shape)
        accepted = set(inspect.signature(scheduler.set_timesteps).parameters)
        refused = [k for k in kwargs if k not in accepted and k != "num_inference_steps"]
        if refused:
            raise InvalidParam("scheduler", f"{type(scheduler).__name__} cannot take this model's "
                                            f"{' and '.join(refused)} (use the model's own scheduler)",
                               code="unsupported_value")
        scheduler.set_timesteps(**kwargs, device=self.device)

    def _capabilities(self, guidance: bool) -> Capabilities:
        # Masked compute: `edits.masked_dit` (image tokens' keys/values cached per attention).
        return Capabilities(masked_compute=True, guidance=guidance, prediction_type="flow")

    # -- the VAE -------------------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """As the families' img2img pipelines (`(latents - shift) * scale`), the distribution's mode."""
        vae = self.pipe.vae
        x = self.pipe.image_processor.preprocess(image).to(self.device, dtype=vae.dtype)
        latents = vae.encode(x).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """As the end of the pipelines' `__call__`: unscale, unshift, decode, post-process."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)
