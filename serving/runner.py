"""The model runner: owns every request's tensors and runs one batched denoising step.

Mirrors `StableDiffusionPipeline.__call__` exactly (same prompt encoding, same initial
noise from the request's own generator, same scaling, guidance and scheduler step), but
for many requests at once: their latents are concatenated into one UNet call with a
per-sample timestep tensor, and each request's slice goes back through its own scheduler.
So a request's result does not depend on who shared its batch (up to float rounding).

Threading: `prepare` and `decode` run on the engine's auxiliary thread, `step` on the step
loop thread; they touch disjoint requests, and the modules are read-only at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stepfleet.serving.loading import LoadedModel
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.schedulers import make_scheduler, step_kwargs_for


@dataclass
class RequestTensors:
    """Everything about one request that lives on the device."""

    latents: torch.Tensor  # (n, C, h, w)
    scheduler: Any
    generator: torch.Generator
    timesteps: torch.Tensor
    cond: torch.Tensor  # (n, L, D) text embeddings
    uncond: torch.Tensor | None  # (n, L, D) negative embeddings when guidance is on
    guidance_scale: float
    step_index: int = 0
    extra_step: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> bool:
        return self.uncond is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    @property
    def unet_rows(self) -> int:
        return self.latents.shape[0] * (2 if self.cfg else 1)


class ModelRunner:
    """Stateless over requests: the engine passes in the `RequestTensors` it keeps."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.pipe = model.pipeline
        self._base_scheduler_config = self.pipe.scheduler.config
        self._base_scheduler_class = type(self.pipe.scheduler)
        # LCM-distilled UNets take guidance as an embedding instead of a second pass.
        self._guidance_embedding = self.pipe.unet.config.time_cond_proj_dim is not None
        if self._guidance_embedding:
            raise NotImplementedError("UNets with time_cond_proj_dim (LCM-distilled) are not supported yet")

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        f = self.model.vae_scale_factor
        return (self.model.latent_channels, height // f, width // f)

    @torch.inference_mode()
    def prepare(self, params: GenerationParams, seed: int) -> RequestTensors:
        """Encode the prompt and draw the initial noise, as the pipeline does."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        device = self.model.device
        cfg = params.guidance_scale > 1.0
        cond, uncond = pipe.encode_prompt(
            params.prompt,
            device,
            params.n,
            cfg,
            negative_prompt=params.negative_prompt,
        )
        scheduler = make_scheduler(params.scheduler, self._base_scheduler_config, self._base_scheduler_class)
        scheduler.set_timesteps(params.num_inference_steps, device=device)
        # A CPU generator draws the same noise on every backend, so a seed means one image.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        c, h, w = self.latent_shape(params.width, params.height)
        latents = randn_tensor((params.n, c, h, w), generator=generator, device=device, dtype=cond.dtype)
        latents = latents * scheduler.init_noise_sigma
        accepted = step_kwargs_for(type(scheduler))
        extra: dict[str, Any] = {}
        if "eta" in accepted:
            extra["eta"] = 0.0
        if "generator" in accepted:
            extra["generator"] = generator
        return RequestTensors(
            latents=latents,
            scheduler=scheduler,
            generator=generator,
            timesteps=scheduler.timesteps,
            cond=cond,
            uncond=uncond if cfg else None,
            guidance_scale=params.guidance_scale,
            extra_step=extra,
        )

    @torch.inference_mode()
    def step(self, batch: Sequence[RequestTensors]) -> None:
        """One denoising step for every request in `batch` (same latent shape), in one UNet call."""
        inputs, embeds, times = [], [], []
        for r in batch:
            t = r.timesteps[r.step_index]
            x = r.scheduler.scale_model_input(r.latents, t) if hasattr(r.scheduler, "scale_model_input") else r.latents
            n = x.shape[0]
            if r.cfg:
                inputs += [x, x]
                embeds += [r.uncond, r.cond]
                times.append(t.float().expand(2 * n) if torch.is_tensor(t) else torch.full((2 * n,), float(t)))
            else:
                inputs.append(x)
                embeds.append(r.cond)
                times.append(t.float().expand(n) if torch.is_tensor(t) else torch.full((n,), float(t)))
        device = self.model.device
        sample = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        timestep = torch.cat([t.to(device) for t in times])
        hidden = torch.cat(embeds) if len(embeds) > 1 else embeds[0]
        noise = self.pipe.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        offset = 0
        for r in batch:
            n = r.latents.shape[0]
            if r.cfg:
                uncond, text = noise[offset : offset + n], noise[offset + n : offset + 2 * n]
                pred = uncond + r.guidance_scale * (text - uncond)
                offset += 2 * n
            else:
                pred = noise[offset : offset + n]
                offset += n
            t = r.timesteps[r.step_index]
            r.latents = r.scheduler.step(pred, t, r.latents, **r.extra_step, return_dict=False)[0]
            r.step_index += 1

    @torch.inference_mode()
    def decode(self, r: RequestTensors, output_type: str = "pil") -> Any:
        """Latents → images (PIL, or "np" floats for exact comparisons), as the pipeline makes them."""
        pipe = self.pipe
        latents = r.latents.to(pipe.vae.dtype)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])
