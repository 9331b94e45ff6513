"""The model runner: owns every request's tensors and runs one batched denoising step.

Backbone-agnostic. It mirrors the diffusers pipelines' loop — initial noise from the
request's own generator, scaled model input, classifier-free guidance, the request's own
scheduler step — for many requests at once: their latents are concatenated into one
denoiser call with a per-sample timestep tensor and per-row conditioning, and each
request's slice goes back through its own scheduler. So a request's result does not depend
on who shared its batch (up to float rounding). What a model family needs (text encoders,
the denoiser's arguments, latent layout, VAE) is the backbone's (`serving.backbones`).

Add-ons are *extensions* with hooks at fixed points of a request's life (`Extension`):
`prepare` (after the prompt is encoded and the noise drawn), `denoising` (around each
batched denoiser call; e.g. masked compute for edits), `after_step` (each request's new
latents; e.g. keep the template's latents outside an edit's mask) and `finish` (the decoded
images; e.g. the exact composite). The runner calls them and knows nothing of what they do.
An extension that also feeds the denoiser (ControlNet's residuals) implements `InputExtension`:
its `denoiser_inputs` are extra keyword arguments of the batch's one denoiser call.

Threading: `prepare` and `decode` run on the engine's auxiliary thread (or, on the CPU,
on the step loop between steps; see `serving.auxwork`), `step` on the step loop thread;
they touch disjoint requests, and the modules are read-only at inference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from stepfleet.serving.backbones.base import (
    Backbone,
    Conditioning,
    DenoiserExtras,
    MakesVideo,
    SetsTimesteps,
)
from stepfleet.serving.backends import step_boundary
from stepfleet.serving.contracts import CACHED_EDIT_VARIANT, Decoded, EditPath, Prepared, Shape
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.schedulers import (
    init_noise_sigma,
    make_scheduler,
    scale_model_input,
    step_kwargs_for,
)

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from stepfleet.serving.compiled.denoiser import CompiledDenoiser
    from stepfleet.serving.contracts import ImageBatch


@dataclass(eq=False)
class RequestState:
    """One request's device-side state; the runner's `S` in `contracts.Runner[S]`."""

    params: GenerationParams
    latents: torch.Tensor  # (n, C, h, w)
    scheduler: SchedulerMixin
    generator: torch.Generator
    #: The timesteps it will run (an edit with strength < 1 starts part-way down the schedule).
    timesteps: torch.Tensor
    conditioning: Conditioning
    guidance_scale: float
    step_kwargs: dict[str, object] = field(default_factory=dict)
    step_index: int = 0
    #: How an edit runs (set by the edits extension; None for other requests).
    edit_path: EditPath | None = None
    #: What its steps cost like, when not like a plain request's (an extension may set it in
    #: `prepare`, e.g. ControlNet's): the engine learns step costs per variant (`costmodel`).
    cost_variant: str | None = None
    #: The last step's guided model output, and the clean latents (x0) its scheduler predicted
    #: when its `step` returns them (DDIM, Euler, LCM; None for PNDM, DPM-Solver): references
    #: set before `after_step`, for extensions that look at a request's progress (previews).
    model_output: torch.Tensor | None = None
    predicted_x0: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.conditioning.guided

    @property
    def shape(self) -> Shape:
        return tuple(int(d) for d in self.latents.shape[1:])  # (C, h, w), or (C, F, h, w) for videos

    @property
    def images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def unet_rows(self) -> int:
        return self.images * (2 if self.guided else 1)

    @property
    def steps_left(self) -> int:
        return len(self.timesteps) - self.step_index


class Extension(Protocol):
    """An add-on's hooks into the runner; each keeps its own per-request state."""

    def prepare(self, state: RequestState) -> None:
        """After encoding and noise: claim the request if it is this add-on's, adjust its state."""
        ...

    def denoising(self, batch: Sequence[RequestState]) -> AbstractContextManager[None]:
        """Entered around the batch's one denoiser call."""
        ...

    def after_step(self, state: RequestState, latents: torch.Tensor) -> torch.Tensor:
        """The request's latents after its scheduler step (before `step_index` advances)."""
        ...

    def finish(self, state: RequestState, decode: Callable[[], ImageBatch]) -> ImageBatch | None:
        """The request's images: None leaves them to the runner; else call `decode()` (or not) and
        return what the client gets (e.g. a template recording returns none, an edit its composite)."""
        ...


@runtime_checkable
class InputExtension(Protocol):
    """An extension that also feeds the denoiser (ControlNet residuals): an optional, sixth hook."""

    def denoiser_inputs(self, batch: Sequence[RequestState], sample: torch.Tensor, timestep: torch.Tensor,
                        cond: Mapping[str, torch.Tensor]) -> DenoiserExtras:
        """Extra keyword arguments for the batch's one denoiser call, rows as `sample`'s ({} for none)."""
        ...


class ModelRunner:
    """Stateless over requests: the engine passes in the `RequestState`s it keeps."""

    def __init__(self, backbone: Backbone, extensions: Sequence[Extension] = (),
                 compiled: CompiledDenoiser | None = None) -> None:
        self.backbone = backbone
        self.extensions = list(extensions)
        #: The denoiser compiled per shape bucket (`serving.compiled`), or None: eager calls.
        self.compiled = compiled
        self._scheduler_config = backbone.scheduler.config
        self._scheduler_class = type(backbone.scheduler)

    @property
    def device_type(self) -> str:
        """`cpu`, `cuda`, `xla`…: the engine runs auxiliary work inline on the CPU."""
        return self.backbone.device.type

    @property
    def default_size(self) -> tuple[int, int]:
        return self.backbone.default_size

    def latent_shape(self, width: int, height: int) -> Shape:
        return self.backbone.latent_shape(width, height)

    def request_shape(self, params: GenerationParams) -> Shape:
        """A request's latent shape: a video family's (C, F, h, w) for its frames, else (C, h, w)."""
        if isinstance(self.backbone, MakesVideo):
            return self.backbone.video_latent_shape(params.width, params.height, params.num_frames or 1)
        return self.latent_shape(params.width, params.height)

    def new_scheduler(self, name: str | None, steps: int, shape: Shape | None = None) -> SchedulerMixin:
        """A fresh scheduler of `name` (None: the checkpoint's own) with its timesteps set; for
        latents of `shape` by the backbone where its schedule depends on it (`SetsTimesteps`)."""
        scheduler = make_scheduler(name, self._scheduler_config, self._scheduler_class)
        if shape is not None and isinstance(self.backbone, SetsTimesteps):
            self.backbone.set_timesteps(scheduler, steps, shape)
        else:
            scheduler.set_timesteps(steps, device=self.backbone.device)
        return scheduler

    @torch.inference_mode()
    def prepare(self, params: GenerationParams, seed: int) -> Prepared[RequestState]:
        """Encode the prompt and draw the initial noise, as the pipelines do."""
        from diffusers.utils.torch_utils import randn_tensor

        guided = params.guidance_scale > 1.0 and self.backbone.capabilities.guidance
        shape = self.request_shape(params)
        if self.compiled is not None:  # a size no graph was compiled for: 400, never a recompile
            self.compiled.check_shape(shape)
        conditioning = self.backbone.encode_prompt(params, guided)
        scheduler = self.new_scheduler(params.scheduler, params.num_inference_steps, shape)
        # A CPU generator draws the same noise on every backend, so a seed means one image.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = randn_tensor((params.n, *shape), generator=generator, device=self.backbone.device,
                               dtype=conditioning.dtype)
        accepted = step_kwargs_for(type(scheduler))
        step_kwargs: dict[str, object] = {}
        if "eta" in accepted:
            step_kwargs["eta"] = 0.0
        if "generator" in accepted:
            step_kwargs["generator"] = generator
        state = RequestState(
            params=params,
            latents=latents * init_noise_sigma(scheduler),
            scheduler=scheduler,
            generator=generator,
            timesteps=scheduler.timesteps,
            conditioning=conditioning,
            guidance_scale=params.guidance_scale,
            step_kwargs=step_kwargs,
        )
        for ext in self.extensions:
            ext.prepare(state)
        return Prepared(
            state=state,
            shape=state.shape,
            unet_rows=state.unet_rows,
            steps=state.steps_left,
            cost_variant=CACHED_EDIT_VARIANT if state.edit_path is EditPath.CACHED else state.cost_variant,
        )

    @staticmethod
    def _batch_inputs(batch: Sequence[RequestState]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(sample, timestep, conditioning) for one denoiser call: per request [negative×n, positive×n]."""
        samples: list[torch.Tensor] = []
        times: list[torch.Tensor] = []
        conds: list[dict[str, torch.Tensor]] = []
        for r in batch:
            t = r.timesteps[r.step_index]
            x = scale_model_input(r.scheduler, r.latents, t)
            copies = 2 if r.guided else 1
            samples += [x] * copies
            if r.conditioning.negative is not None:
                conds.append(r.conditioning.negative)
            conds.append(r.conditioning.positive)
            t = t.float() if torch.is_tensor(t) else torch.tensor(float(t))
            times.append(t.to(x.device).expand(copies * r.images))
        keys = conds[0].keys()
        cond = {k: torch.cat([c[k] for c in conds]) if len(conds) > 1 else conds[0][k] for k in keys}
        sample = torch.cat(samples) if len(samples) > 1 else samples[0]
        return sample, torch.cat(times), cond

    @torch.inference_mode()
    def step(self, batch: Sequence[RequestState]) -> None:
        """One denoising step for every request in `batch` (same latent shape), in one denoiser call."""
        sample, timestep, cond = self._batch_inputs(batch)
        extras: DenoiserExtras = {}
        for ext in self.extensions:
            if isinstance(ext, InputExtension):
                extras.update(ext.denoiser_inputs(batch, sample, timestep, cond))
        with ExitStack() as stack:
            changed = False  # an extension that leaves the denoiser alone this step returns a nullcontext
            for ext in self.extensions:
                context = ext.denoising(batch)
                changed = changed or not isinstance(context, nullcontext)
                stack.enter_context(context)
            if self.compiled is not None:
                noise = self.compiled(sample, timestep, cond, extras, eager_reason="add-on" if changed else None)
            else:
                noise = self.backbone.denoise(sample, timestep, cond, extras) if extras else \
                    self.backbone.denoise(sample, timestep, cond)
        offset = 0
        for r in batch:
            n = r.images
            if r.guided:
                uncond, text = noise[offset : offset + n], noise[offset + n : offset + 2 * n]
                pred = uncond + r.guidance_scale * (text - uncond)
                offset += 2 * n
            else:
                pred = noise[offset : offset + n]
                offset += n
            t = r.timesteps[r.step_index]
            out = r.scheduler.step(pred, t, r.latents, **r.step_kwargs, return_dict=False)
            latents = out[0]
            r.model_output, r.predicted_x0 = pred, (out[1] if len(out) > 1 else None)
            for ext in self.extensions:
                latents = ext.after_step(r, latents)
            r.latents = latents
            r.step_index += 1
        step_boundary(self.device_type)  # XLA: one graph per step, not one growing graph

    @torch.inference_mode()
    def decode(self, state: RequestState, keep_latents: bool = False, output_type: str = "pil") -> Decoded:
        """Latents → images (PIL, or "np" floats for exact comparisons), as the pipeline makes them."""
        def decode() -> ImageBatch:
            return self.backbone.decode(state.latents, output_type=output_type)

        images: ImageBatch | None = None
        for ext in self.extensions:
            images = ext.finish(state, decode)
            if images is not None:
                break
        if images is None:
            images = decode()
        return Decoded(
            images=images,
            latents=state.latents.detach().to("cpu") if keep_latents else None,
            edit_path=state.edit_path,
        )
