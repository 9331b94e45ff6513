"""Stable Diffusion 3 / 3.5 (MMDiT): CLIP-L, CLIP-G and an optional T5, an `SD3Transformer2DModel`.

Mirrors `StableDiffusion3Pipeline.__call__` step for step, so a request equals the pipeline run
alone with the same seed:

- the prompt goes through the pipeline's own `encode_prompt`: both CLIPs' penultimate hidden
  states concatenated and zero-padded to T5's width, then T5's tokens appended along the
  sequence (zeros when the checkpoint has no T5, which diffusers allows:
  `text_encoder_3=None`); the CLIPs' pooled projections concatenated as `pooled_projections`.
  `prompt_2`/`prompt_3` default to the prompt; the negative prompt defaults to "" (encoded).
  T5 runs at the pipeline's default `max_sequence_length` (256).
- the transformer gets the scheduler's timesteps as they are (sigma × 1000) per row.
- the schedule: `set_timesteps(steps)`, shifted by `mu` for the image's token count only when
  the scheduler config sets `use_dynamic_shifting` (SD3/3.5 use a fixed `shift` of 3).
- classifier-free guidance as the runner does it for every family: a negative row per image.
  Skip-layer guidance (SD3.5's optional `skip_guidance_layers`) is not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from stepfleet.serving.backbones.base import Conditioning, DenoiserExtras
from stepfleet.serving.backbones.flow import FlowBackbone, shift_for
from stepfleet.serving.contracts import Shape
from stepfleet.serving.params import GenerationParams

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

#: `StableDiffusion3Pipeline.__call__`'s default T5 length.
MAX_SEQUENCE_LENGTH = 256


class StableDiffusion3Backbone(FlowBackbone):
    """SD3/SD3.5 checkpoints (`StableDiffusion3Pipeline`), family `sd3`."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.family = "sd3"
        self.capabilities = self._capabilities(guidance=True)
        cfg = pipe.transformer.config
        self.patch = int(cfg.patch_size)
        self.latent_channels = int(cfg.in_channels)
        size = int(pipe.default_sample_size) * self.vae_scale_factor
        self.default_size = (size, size)

    def schedule_kwargs(self, scheduler: SchedulerMixin, steps: int, shape: Shape) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_inference_steps": steps}
        if scheduler.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = shift_for(scheduler.config, self.tokens(shape), default_max_shift=1.16)
        return kwargs

    def encode_prompt(self, params: GenerationParams, guidance: bool) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=params.prompt, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=params.n, do_classifier_free_guidance=guidance,
            negative_prompt=params.negative_prompt, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        positive = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if not guidance:
            return Conditioning(positive=positive, negative=None)
        return Conditioning(positive=positive,
                            negative={"encoder_hidden_states": negative, "pooled_projections": negative_pooled})

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                extras: DenoiserExtras | None = None) -> torch.Tensor:
        return self.denoiser(hidden_states=sample, timestep=timestep,
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"], return_dict=False,
                             **(extras or {}))[0]
