"""The model runner: owns every request's tensors and runs one batched denoising step.

Mirrors `StableDiffusionPipeline.__call__` exactly (same prompt encoding, same initial
noise from the request's own generator, same scaling, guidance and scheduler step), but
for many requests at once: their latents are concatenated into one UNet call with a
per-sample timestep tensor, and each request's slice goes back through its own scheduler.
So a request's result does not depend on who shared its batch (up to float rounding).

Edits (issue 3) run through the same loop, inpainting-style as diffusers'
`StableDiffusionInpaintPipeline` with a plain 4-channel UNet: after every step, outside the
latent mask, the latents are replaced by the template's noised latents for the next step
(`init_latents_proper`), and at the end by the template's own latents; the decoded image
then takes the template's pixels outside the pixel mask (`composite`). A template is
registered by a RECORD run of its image (all of it "kept"), which stores every step's
attention activations in the `TemplateCache`; an edit with the template's settings then
computes attention only for masked tokens (`MaskedUNet`, the cached path). Since its
latents outside the mask are exactly the template's at every step, the cached activations
there are the ones full compute would produce up to the convolutions' reach into the mask.
Any other edit, or one whose template steps were evicted, runs in full (`edit_path`).

Threading: `prepare` and `decode` run on the engine's auxiliary thread (or, on the CPU, on
the step loop between steps; see `serving.auxwork`), `step` on the step loop thread; they touch disjoint requests, and the modules are read-only at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stepfleet.serving.loading import LoadedModel
from stepfleet.serving.params import EditSpec, GenerationParams
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
    # -- edits and template recordings only (None for text-to-image) --
    #: "record" (full compute, store activations), "edit" (masked compute), None (full compute).
    edit_kind: str | None = None
    template_id: str | None = None
    template_rows: int = 1
    token_masks: Any = None
    latent_mask: torch.Tensor | None = None  # (1, 1, h, w) bool, True = may change
    noised: list[torch.Tensor] | None = None  # latents outside the mask before step i; [-1]: final
    pixel_mask: Any = None  # (H, W) bool, for the composite after decoding
    base_image: Any = None  # PIL image whose pixels are kept outside the mask
    edit_path: str | None = None  # "cached" | "full" for edits; reported to the client
    num_steps: int | None = None  # steps actually run when `strength` < 1 skips some

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

    def __init__(self, model: LoadedModel, template_cache: Any = None) -> None:
        from stepfleet.serving.edits.templates import TemplateRegistry

        self.model = model
        self.pipe = model.pipeline
        self.cache = None  # TemplateCache, once edits are enabled
        self.mu = None  # MaskedUNet, once edits are enabled
        self.templates = TemplateRegistry()
        self._base_scheduler_config = self.pipe.scheduler.config
        self._base_scheduler_class = type(self.pipe.scheduler)
        # LCM-distilled UNets take guidance as an embedding instead of a second pass.
        self._guidance_embedding = self.pipe.unet.config.time_cond_proj_dim is not None
        if self._guidance_embedding:
            raise NotImplementedError("UNets with time_cond_proj_dim (LCM-distilled) are not supported yet")
        if template_cache is not None:
            self.enable_edits(template_cache)

    @property
    def device_type(self) -> str:
        """`cpu`, `cuda`, `xla`…: the engine runs auxiliary work inline on the CPU."""
        return self.model.device.type

    # -- edits ---------------------------------------------------------------------------
    def enable_edits(self, cache: Any) -> None:
        """Install masked compute into the UNet (plain calls are unchanged) backed by `cache`."""
        from stepfleet.serving.edits.masked_unet import MaskedUNet

        if self.mu is not None:
            self.cache = self.mu.cache = cache
            return
        self.mu = MaskedUNet(self.pipe.unet, cache)
        self.cache = cache

    def disable_edits(self) -> None:
        """Uninstall masked compute (the cache stays the caller's to close)."""
        if self.mu is not None:
            self.mu.uninstall()
        self.mu = None

    def template_cached(self, template_id: str, num_steps: int) -> bool:
        return self.cache is not None and self.cache.complete(template_id, num_steps)

    def drop_template(self, template_id: str) -> None:
        self.templates.remove(template_id)
        if self.cache is not None:
            self.cache.drop(template_id)

    def encode_image(self, image: Any) -> torch.Tensor:
        """PIL image → (1, C, h, w) latents (the distribution's mode, so deterministic)."""
        pipe = self.pipe
        x = pipe.image_processor.preprocess(image).to(self.model.device, dtype=pipe.vae.dtype)
        return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor

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
        r = RequestTensors(
            latents=latents,
            scheduler=scheduler,
            generator=generator,
            timesteps=scheduler.timesteps,
            cond=cond,
            uncond=uncond if cfg else None,
            guidance_scale=params.guidance_scale,
            extra_step=extra,
        )
        if params.edit is not None:
            self._prepare_edit(r, params, seed, params.edit)
        return r

    def _noised(self, params: GenerationParams, timesteps: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                strength: float) -> list[torch.Tensor]:
        """The template's latents before each step (as the inpainting pipeline blends them), then x0."""
        sched = make_scheduler(params.scheduler, self._base_scheduler_config, self._base_scheduler_class)
        sched.set_timesteps(params.num_inference_steps, device=self.model.device)
        out = []
        for i in range(len(timesteps)):
            if i == 0 and strength >= 1.0:
                out.append(noise * sched.init_noise_sigma)
            else:
                out.append(sched.add_noise(x0, noise, timesteps[i : i + 1]))
        out.append(x0)
        return out

    def _prepare_edit(self, r: RequestTensors, params: GenerationParams, seed: int, spec: EditSpec) -> None:
        from diffusers.utils.torch_utils import randn_tensor

        from stepfleet.serving.edits.masks import TokenMasks, latent_mask
        from stepfleet.serving.edits.templates import TemplateKey

        device = self.model.device
        f = self.model.vae_scale_factor
        sched = r.scheduler
        if spec.strength < 1.0:  # as the img2img/inpaint pipelines' get_timesteps
            keep = min(int(params.num_inference_steps * spec.strength), params.num_inference_steps)
            start = (params.num_inference_steps - keep) * getattr(sched, "order", 1)
            r.timesteps = sched.timesteps[start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            if len(r.timesteps) == 0:
                raise ValueError(f"strength {spec.strength} leaves no denoising steps")
        r.num_steps = len(r.timesteps)
        key = TemplateKey(params.width, params.height, params.num_inference_steps, params.scheduler,
                          float(params.guidance_scale), seed, float(spec.strength))
        template = self.templates.get(spec.template_id) if spec.template_id else None
        if spec.template_id and template is None:
            raise KeyError(f"template {spec.template_id!r} is not registered")
        c, h, w = self.latent_shape(params.width, params.height)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = randn_tensor((params.n, c, h, w), generator=gen, device=device, dtype=r.cond.dtype)
        if spec.record:
            assert template is not None and params.n == 1
            x0 = self.encode_image(template.image).to(r.cond.dtype)
            template.latents = x0
            template.noised = self._noised(params, r.timesteps, x0, noise[:1], spec.strength)
            template.template_rows = 2 if r.cfg else 1
            r.edit_kind, r.template_id, r.template_rows = "record", template.id, template.template_rows
            r.noised = template.noised
            r.latent_mask = torch.zeros((1, 1, h, w), dtype=torch.bool, device=device)
            r.latents = r.noised[0].clone()
            return
        base = template.image if template is not None else spec.image
        r.base_image = base
        r.pixel_mask = spec.pixel_mask
        lm = latent_mask(spec.pixel_mask, f)
        r.latent_mask = lm[None, None].to(device)
        same = template is not None and template.state == "ready" and template.key == key
        if same:
            r.noised = template.noised  # the template's own: exactness outside the mask
            x0 = template.latents
        else:
            x0 = template.latents if template is not None and template.latents is not None else None
            if x0 is None:
                x0 = self.encode_image(base).to(r.cond.dtype)
            r.noised = self._noised(params, r.timesteps, x0, noise[:1], spec.strength)
        if spec.strength >= 1.0:
            init = noise * sched.init_noise_sigma
        else:
            init = sched.add_noise(x0.expand_as(noise), noise, r.timesteps[:1].repeat(params.n))
        r.latents = torch.where(r.latent_mask, init, r.noised[0])
        cached = same and spec.use_cache and self.mu is not None and self.template_cached(template.id, r.num_steps)
        if cached:
            r.edit_kind, r.template_id, r.template_rows = "edit", template.id, template.template_rows
            r.token_masks = TokenMasks.from_latent(lm)
        r.edit_path = "cached" if cached else "full"

    def _rows(self, batch: Sequence[RequestTensors]) -> list[Any] | None:
        """Per-UNet-row plans for the masked UNet, or None when the batch has no edit or recording."""
        if not any(r.edit_kind for r in batch):
            return None
        from stepfleet.serving.edits.masked_unet import EditRow, RecordRow, expand_rows

        rows: list[Any] = []
        for r in batch:
            plan = None
            if r.edit_kind == "record":
                plan = RecordRow(r.template_id, r.step_index)
            elif r.edit_kind == "edit":
                plan = EditRow(r.template_id, r.step_index, r.token_masks)
            rows += expand_rows(plan, r.latents.shape[0], r.cfg, r.template_rows)
        return rows

    def _unet(self, batch: Sequence[RequestTensors], sample, timestep, hidden) -> torch.Tensor:
        """One UNet call; edits whose template steps are gone from the cache fall back to full compute."""
        from stepfleet.serving.edits.masked_unet import TemplateMissingError

        for _attempt in range(3):
            rows = self._rows(batch)
            if rows is None:
                return self.pipe.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
            self.mu.cache = self.cache
            gone = {tid for tid, _ in self.mu.missing(rows)}
            for r in batch:
                if r.edit_kind == "edit" and r.template_id in gone:
                    r.edit_kind, r.edit_path = None, "full"
            rows = self._rows(batch)
            if rows is None:
                continue
            try:
                return self.mu(sample, timestep, hidden, rows=rows)
            except TemplateMissingError:  # evicted by a concurrent prefetch between check and use
                continue
        for r in batch:
            if r.edit_kind == "edit":
                r.edit_kind, r.edit_path = None, "full"
        return self.mu(sample, timestep, hidden, rows=self._rows(batch))

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
        if self.mu is None:
            noise = self.pipe.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        else:
            noise = self._unet(batch, sample, timestep, hidden)
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
            if r.edit_kind == "record":  # the template keeps its own (noised) latents everywhere
                r.latents = r.noised[r.step_index + 1]
            else:
                r.latents = r.scheduler.step(pred, t, r.latents, **r.extra_step, return_dict=False)[0]
                if r.noised is not None:
                    r.latents = torch.where(r.latent_mask, r.latents, r.noised[r.step_index + 1])
            r.step_index += 1

    @torch.inference_mode()
    def decode(self, r: RequestTensors, output_type: str = "pil") -> Any:
        """Latents → images (PIL, or "np" floats for exact comparisons), as the pipeline makes them."""
        pipe = self.pipe
        if r.edit_kind == "record":  # a template recording: nothing to show but the template itself
            template = self.templates.get(r.template_id)
            if template is not None:
                template.state = "ready"
            return []
        latents = r.latents.to(pipe.vae.dtype)
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(image, output_type=output_type,
                                                  do_denormalize=[True] * image.shape[0])
        if r.pixel_mask is None:
            return images
        from stepfleet.serving.edits.masks import composite

        if output_type == "pil":
            return [composite(im, r.base_image, r.pixel_mask) for im in images]
        import numpy as np

        base = np.asarray(r.base_image.convert("RGB"), dtype=np.float32) / 255.0
        return np.stack([composite(im, base, r.pixel_mask) for im in images])
