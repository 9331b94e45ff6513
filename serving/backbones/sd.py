"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a `UNet2DConditionModel`, the SD VAE.

Mirrors `StableDiffusionPipeline.__call__` step for step: the pipeline's own
`encode_prompt` (so tokenisation, truncation and the negative prompt match exactly), the
UNet called with a per-sample timestep tensor, the VAE decoded and post-processed by the
pipeline's image processor. SD 2.x `v_prediction` checkpoints need nothing here: the
scheduler reads `prediction_type` from its config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from stepfleet.serving.backbones.base import Capabilities, Conditioning, DenoiserExtras
from stepfleet.serving.contracts import Shape
from stepfleet.serving.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


class UNetBackbone:
    """What SD and SDXL share: a UNet denoiser, the SD VAE and its image processor."""

    family: str
    capabilities: Capabilities

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.scheduler = pipe.scheduler
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise NotImplementedError("UNets with time_cond_proj_dim (LCM-distilled) are not supported yet")
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        sample = pipe.unet.config.sample_size
        sample = sample if isinstance(sample, int) else sample[0]
        self.default_size = (sample * self.vae_scale_factor, sample * self.vae_scale_factor)
        self.latent_channels = int(pipe.unet.config.in_channels)

    def _capabilities(self) -> Capabilities:
        return Capabilities(
            masked_compute=True,  # attention lives in Transformer2DModel blocks (edits.masked_unet)
            guidance=True,
            prediction_type=str(self.scheduler.config.get("prediction_type", "epsilon")),
        )

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def latent_shape(self, width: int, height: int) -> Shape:
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        vae = self.pipe.vae
        x = self.pipe.image_processor.preprocess(image).to(self.device, dtype=vae.dtype)
        return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type,
                                                     do_denormalize=[True] * image.shape[0])


class StableDiffusionBackbone(UNetBackbone):
    """SD 1.x (`sd15`) and 2.x (`sd2`, including `v_prediction` checkpoints)."""

    def __init__(self, pipe: Any, family: str = "sd15") -> None:
        super().__init__(pipe)
        self.family = family
        self.capabilities = self._capabilities()

    def encode_prompt(self, params: GenerationParams, guidance: bool) -> Conditioning:
        cond, uncond = self.pipe.encode_prompt(
            params.prompt, self.device, params.n, guidance, negative_prompt=params.negative_prompt
        )
        return Conditioning(
            positive={"encoder_hidden_states": cond},
            negative={"encoder_hidden_states": uncond} if guidance else None,
        )

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                extras: DenoiserExtras | None = None) -> torch.Tensor:
        return self.denoiser(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                             return_dict=False, **(extras or {}))[0]
