"""Flux: CLIP (pooled) + T5, a `FluxTransformer2DModel` on 2×2-packed latents with rotary ids.

Mirrors `FluxPipeline.__call__` step for step, so a request equals the pipeline run alone with
the same seed:

- Latents stay unpacked in the runner, (C, h, w) like every family's, and are packed into
  (h/2 · w/2) tokens of 4·C channels inside `denoise` and unpacked on the way out. That is
  exact: the pipeline draws its noise unpacked and packs it, packing is a permutation, and the
  flow-matching scheduler's step is elementwise, so stepping unpacked latents gives the
  pipeline's numbers permuted back. The runner, the edits' masks and the previews keep one
  latent layout.
- Rotary position ids: text ids are zeros (one row per T5 token), image ids (0, row, col) per
  packed token, as `_prepare_latent_image_ids` makes them; both are the same for every row of a
  batch of one latent shape, so they are built per call from the shapes, not carried per row.
- The timestep is the scheduler's divided by 1000 (in the latents' dtype, as the pipeline
  casts it).
- Guidance. Guidance-distilled checkpoints (FLUX.1-dev: `guidance_embeds`) take the request's
  `guidance_scale` as an input: a per-row conditioning tensor `guidance`, so requests with
  different scales share a batch. There are no negative rows (`Capabilities.guidance` is
  False): the pipeline's separate `true_cfg_scale` is not offered. Without `guidance_embeds`
  (FLUX.1-schnell) the scale is ignored, as the pipeline ignores it.
- The schedule: sigmas `linspace(1, 1/steps, steps)` (none when the scheduler config says
  `use_flow_sigmas`), shifted by `mu` for the packed token count, and `set_begin_index(0)`.
- T5 runs at the pipeline's default `max_sequence_length` (512).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stepfleet.serving.backbones.base import Conditioning, DenoiserExtras
from stepfleet.serving.backbones.flow import FlowBackbone, shift_for
from stepfleet.serving.contracts import Shape
from stepfleet.serving.params import GenerationParams

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

#: `FluxPipeline.__call__`'s default T5 length.
MAX_SEQUENCE_LENGTH = 512


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2 · w/2, 4C): `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 · w/2, 4C) → (B, C, h, w): `FluxPipeline._unpack_latents` in latent units."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


class FluxBackbone(FlowBackbone):
    """Flux checkpoints (`FluxPipeline`), family `flux`."""

    patch = 2  # the 2×2 packing

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.family = "flux"
        self.capabilities = self._capabilities(guidance=False)
        cfg = pipe.transformer.config
        self.latent_channels = int(cfg.in_channels) // 4
        self.guidance_embeds = bool(cfg.guidance_embeds)
        # The pipeline's default is 128 latents (1024 px), its real VAE's `sample_size`; the VAE's
        # own `sample_size` lets a small built-in declare a default a CPU can serve.
        size = int(pipe.vae.config.sample_size)
        self.default_size = (size, size)
        self._img_ids: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    def schedule_kwargs(self, scheduler: SchedulerMixin, steps: int, shape: Shape) -> dict[str, Any]:
        config = scheduler.config
        kwargs: dict[str, Any] = {"mu": shift_for(config, self.tokens(shape), default_max_shift=1.15)}
        if config.get("use_flow_sigmas", False):
            kwargs["num_inference_steps"] = steps
        else:
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return kwargs

    def set_timesteps(self, scheduler: SchedulerMixin, steps: int, shape: Shape) -> None:
        super().set_timesteps(scheduler, steps, shape)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def encode_prompt(self, params: GenerationParams, guidance: bool) -> Conditioning:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=params.prompt, prompt_2=None, device=self.device, num_images_per_prompt=params.n,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        positive = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if self.guidance_embeds:
            positive["guidance"] = torch.full((params.n,), float(params.guidance_scale), device=self.device,
                                              dtype=torch.float32)
        return Conditioning(positive=positive, negative=None)

    def image_ids(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """(h/2 · w/2, 3) ids (0, row, col) of the packed tokens: `_prepare_latent_image_ids`."""
        key = (h, w, dtype)
        if key not in self._img_ids:
            self._img_ids[key] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, dtype)
        return self._img_ids[key]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                extras: DenoiserExtras | None = None) -> torch.Tensor:
        _, _, h, w = sample.shape
        text = cond["encoder_hidden_states"]
        text_dtype = self.pipe.text_encoder.dtype if self.pipe.text_encoder is not None else self.denoiser.dtype
        txt_ids = torch.zeros(text.shape[1], 3, device=self.device, dtype=text_dtype)
        out = self.denoiser(
            hidden_states=pack(sample),
            timestep=timestep.to(sample.dtype) / 1000,
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=self.image_ids(h, w, text.dtype),
            return_dict=False,
            **(extras or {}),
        )[0]
        return unpack(out, h, w)
