"""Stable Diffusion XL: two CLIP text encoders, a `text_time` UNet, the SDXL VAE.

Mirrors `StableDiffusionXLPipeline.__call__` step for step, so a request equals the pipeline
run alone with the same seed:

- the prompt goes through the pipeline's own `encode_prompt`: both encoders' penultimate
  hidden states concatenated, the second encoder's pooled projection as `text_embeds`;
  `prompt_2`/`negative_prompt_2` are left to default to the first prompt; with no negative
  prompt and `force_zeros_for_empty_prompt` (SDXL base's setting) the negative rows are zeros.
- `time_ids` are (original_size, crop top-left, target_size) in (height, width) order,
  defaulting to the request's own size and (0, 0), checked against the UNet's added
  embedding width with `text_encoder_projection_dim` computed as the pipeline does. The
  negative rows carry the same ids (the pipeline's default: we take no
  `negative_original_size`). They are per row, so requests of different sizes or
  micro-conditioning batch together whenever their latent shapes match.
- the UNet gets `added_cond_kwargs={"text_embeds", "time_ids"}` per row.
- `guidance_rescale` is not offered: it would need the runner to rescale after guidance, and
  the pipeline's default (0.0, no rescale) is what is matched.

The VAE. SDXL's VAE overflows in float16 (`force_upcast` in its config); the pipelines then
cast their VAE to float32 for each call and back afterwards: the text-to-image pipeline
decodes in float32 when the VAE is float16, the img2img pipeline encodes in float32 (from
pixels cast to the working dtype first) whenever `force_upcast` is set. Mutating a shared
module while another thread may be decoding is unsafe, so in a reduced-precision checkpoint
with `force_upcast` this backbone keeps its own float32 copy of the VAE (+4 bytes per VAE
parameter, about 335 MB for SDXL's 84 M) and uses it exactly where the pipelines would
upcast: the same arithmetic, without touching the pipeline's modules. In float32 (tests,
CPUs) the pipeline's own VAE is used and nothing is copied. `latents_mean`/`latents_std` in a
VAE config are honoured as the pipelines do, and the pipeline's invisible watermark is
applied when it has one (the `invisible-watermark` package installed).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from stepfleet.serving.backbones.base import Conditioning, DenoiserExtras
from stepfleet.serving.backbones.sd import UNetBackbone
from stepfleet.serving.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


class StableDiffusionXLBackbone(UNetBackbone):
    """SDXL base-style checkpoints (`StableDiffusionXLPipeline`), family `sdxl`."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.family = "sdxl"
        self.capabilities = self._capabilities()
        if pipe.unet.config.addition_embed_type != "text_time":
            raise NotImplementedError(
                f"SDXL UNets need addition_embed_type 'text_time' (got {pipe.unet.config.addition_embed_type!r})"
            )
        # As `__call__` computes it; without a second encoder, from the pooled embedding's width.
        te2 = pipe.text_encoder_2
        self.text_encoder_projection_dim: int | None = int(te2.config.projection_dim) if te2 is not None else None
        vae = pipe.vae
        #: A float32 copy where the pipelines would upcast (module docstring), else None.
        self.vae32 = (copy.deepcopy(vae).to(torch.float32)
                      if vae.config.force_upcast and vae.dtype != torch.float32 else None)
        #: The text-to-image pipeline upcasts its decode from float16 only.
        self.decode_vae = self.vae32 if self.vae32 is not None and vae.dtype == torch.float16 else vae

    # -- conditioning ------------------------------------------------------------------
    def time_ids(self, params: GenerationParams, dtype: torch.dtype, pooled_dim: int) -> torch.Tensor:
        """(1, 6) micro-conditioning ids, as `StableDiffusionXLPipeline._get_add_time_ids` makes them."""
        size = (params.height, params.width)
        original = tuple(params.original_size or size)
        target = tuple(params.target_size or size)
        projection_dim = self.text_encoder_projection_dim or pooled_dim
        return self.pipe._get_add_time_ids(original, tuple(params.crop_top_left), target, dtype=dtype,
                                           text_encoder_projection_dim=projection_dim).to(self.device)

    def encode_prompt(self, params: GenerationParams, guidance: bool) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=params.prompt, device=self.device, num_images_per_prompt=params.n,
            do_classifier_free_guidance=guidance, negative_prompt=params.negative_prompt,
        )
        n = params.n
        time_ids = self.time_ids(params, embeds.dtype, int(pooled.shape[-1])).repeat(n, 1)
        positive = {"encoder_hidden_states": embeds, "text_embeds": pooled.to(self.device), "time_ids": time_ids}
        if not guidance:
            return Conditioning(positive=positive, negative=None)
        return Conditioning(
            positive=positive,
            negative={"encoder_hidden_states": negative, "text_embeds": negative_pooled.to(self.device),
                      "time_ids": time_ids},  # the pipeline's negative_add_time_ids = add_time_ids
        )

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                extras: DenoiserExtras | None = None) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.denoiser(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                             added_cond_kwargs=added, return_dict=False, **(extras or {}))[0]

    # -- the VAE -------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        c = like.shape[1]
        return (torch.tensor(mean).view(1, c, 1, 1).to(like.device, like.dtype),
                torch.tensor(std).view(1, c, 1, 1).to(like.device, like.dtype))

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """As `StableDiffusionXLImg2ImgPipeline.prepare_latents`, but the distribution's mode."""
        dtype = self.denoiser.dtype
        x = self.pipe.image_processor.preprocess(image).to(self.device, dtype=dtype)
        vae = self.pipe.vae
        if self.vae32 is not None:
            vae, x = self.vae32, x.float()
        latents = vae.encode(x).latent_dist.mode().to(dtype)
        stats = self._latent_stats(latents)
        sf = vae.config.scaling_factor
        if stats is not None:
            return (latents - stats[0]) * sf / stats[1]
        return sf * latents

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """As the end of `StableDiffusionXLPipeline.__call__` (float32 decode of a float16 VAE)."""
        vae = self.decode_vae
        latents = latents.to(vae.dtype)
        stats = self._latent_stats(latents)
        sf = vae.config.scaling_factor
        latents = latents * stats[1] / sf + stats[0] if stats is not None else latents / sf
        image = vae.decode(latents, return_dict=False)[0]
        if getattr(self.pipe, "watermark", None) is not None:
            image = self.pipe.watermark.apply_watermark(image)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)
