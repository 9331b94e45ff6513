"""Wan 2.1 text-to-video (`WanPipeline`): a UMT5 encoder, a `WanTransformer3DModel`, the Wan VAE.

Mirrors `WanPipeline.__call__` step for step, so a request equals the pipeline run alone with
the same seed (`tests/serving/test_wan_exactness.py`):

- the prompt goes through the pipeline's own `encode_prompt` at its default
  `max_sequence_length` (512): UMT5's last hidden states cut to the prompt's tokens and
  zero-padded back; the negative prompt defaults to "" (encoded).
- latents are (C, F, h, w) with F = (num_frames - 1) // 4 + 1 latent frames (the VAE's
  temporal factor), drawn in one `randn_tensor` call from the request's generator as the
  pipeline's `prepare_latents`; the schedule is the plain `set_timesteps(steps)`.
- the transformer takes one timestep per row, so requests at different steps share a call;
  guidance concatenates the negative rows into the same call where the pipeline makes a second
  call (the same rows, so the same numbers up to float rounding).
- decode: un-normalise by the VAE's per-channel `latents_mean`/`latents_std`, decode, and
  post-process as `VideoProcessor.postprocess_video`.

Images. A one-frame request (`num_frames` None or 1) is an image, as Wan 2.1 draws them: its
latents (C, 1, h, w) form their own shape group, and `decode` returns images like the image
families do. So a Wan worker serves the Images and the Videos API from one set of weights,
and the planner co-schedules both kinds (`serving.coschedule`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from stepfleet.serving.backbones.base import Capabilities, Conditioning, DenoiserExtras
from stepfleet.serving.contracts import Shape
from stepfleet.serving.params import GenerationParams, InvalidParam

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: `WanPipeline.__call__`'s default UMT5 length.
MAX_SEQUENCE_LENGTH = 512
#: `WanPipeline.__call__`'s default size (width, height); toy-width test checkpoints use
#: `TINY_DEFAULT_SIZE` so a request without `size` stays cheap on a CPU.
DEFAULT_SIZE = (832, 480)
TINY_DEFAULT_SIZE = (64, 64)


class WanBackbone:
    """Wan 2.1 checkpoints (`WanPipeline`, one transformer), family `wan`."""

    def __init__(self, pipe: Any) -> None:
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
            # Wan 2.2's two-expert MoE switches transformers by timestep and its TI2V model
            # takes per-token timesteps: both need more than one denoiser per shape group.
            raise ValueError("Wan 2.2 checkpoints (two transformers or expand_timesteps) are not served yet")
        self.pipe = pipe
        self.family = "wan"
        self.denoiser = pipe.transformer
        self.scheduler = pipe.scheduler
        self.capabilities = Capabilities(masked_compute=False, guidance=True, prediction_type="flow")
        cfg = pipe.transformer.config
        self.patch: tuple[int, int, int] = tuple(int(p) for p in cfg.patch_size)  # type: ignore[assignment]
        self.latent_channels = int(cfg.in_channels)
        self.spatial = int(pipe.vae_scale_factor_spatial)
        self.temporal = int(pipe.vae_scale_factor_temporal)
        self.default_size = TINY_DEFAULT_SIZE if int(cfg.text_dim) <= 64 else DEFAULT_SIZE

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    # -- shapes --------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` video frames (the VAE keeps the first, then 1 per 4)."""
        return (num_frames - 1) // self.temporal + 1

    def latent_shape(self, width: int, height: int) -> Shape:
        """An image's latents: one frame."""
        return self.video_latent_shape(width, height, 1)

    def video_latent_shape(self, width: int, height: int, num_frames: int) -> Shape:
        """(C, F, h, w); refuses sizes the transformer cannot patchify and frame counts the VAE
        would round (the pipeline silently changes both) as 400s naming the field."""
        step = self.spatial * self.patch[1]
        if width % step or height % step:
            raise InvalidParam("size", f"width and height must be multiples of {step} for this model "
                                       f"(got {width}x{height})")
        if num_frames < 1 or (num_frames - 1) % self.temporal:
            raise InvalidParam("num_frames", f"must be 1 more than a multiple of {self.temporal} for this model "
                                             f"(got {num_frames})")
        return (self.latent_channels, self.latent_frames(num_frames), height // self.spatial, width // self.spatial)

    # -- conditioning and the denoiser -----------------------------------------------------
    def encode_prompt(self, params: GenerationParams, guidance: bool) -> Conditioning:
        dtype = self.denoiser.dtype
        embeds, negative = self.pipe.encode_prompt(
            prompt=params.prompt, negative_prompt=params.negative_prompt, do_classifier_free_guidance=guidance,
            num_videos_per_prompt=params.n, max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device,
        )
        positive = {"encoder_hidden_states": embeds.to(dtype)}
        if not guidance:
            return Conditioning(positive=positive, negative=None)
        return Conditioning(positive=positive, negative={"encoder_hidden_states": negative.to(dtype)})

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                extras: DenoiserExtras | None = None) -> torch.Tensor:
        return self.denoiser(hidden_states=sample.to(self.denoiser.dtype), timestep=timestep,
                             encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False,
                             **(extras or {}))[0]

    # -- the VAE -----------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """An RGB image → (1, C, 1, h, w) normalised latents (the distribution's mode)."""
        vae = self.pipe.vae
        x = self.pipe.video_processor.preprocess(image).to(self.device, dtype=vae.dtype).unsqueeze(2)
        latents = vae.encode(x).latent_dist.mode()
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
        """As the end of `WanPipeline.__call__`. Images (one frame): PIL images, or (n, H, W, 3)
        floats. Videos: the frames of each video in order as PIL images, or (n, F, H, W, 3) floats."""
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        mean, std = self._stats(latents)
        video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # the pipeline's arithmetic
        frames = self.pipe.video_processor.postprocess_video(video, output_type=output_type)
        if output_type == "np":
            return frames[:, 0] if latents.shape[2] == 1 else frames
        return [frame for sample in frames for frame in sample]
