"""Edits as a runner extension: inpainting on a template, by masked compute where it can.

An edit runs through the runner's ordinary loop, inpainting-style as diffusers'
`StableDiffusionInpaintPipeline` with a plain 4-channel denoiser: after every step, outside
the latent mask, the latents are replaced by the template's noised latents for the next step
(`init_latents_proper`), and at the end by the template's own latents; the decoded image then
takes the template's pixels outside the pixel mask (`composite`). A template is registered
by a RECORD run of its image (all of it "kept"), which stores every step's attention
activations in the `TemplateCache`; an edit with the template's settings then computes
attention only for masked tokens (`MaskedUNet`, the cached path). Since its latents outside
the mask are exactly the template's at every step, the cached activations there are the ones
full compute would produce up to the convolutions' reach into the mask. Any other edit, or
one whose template steps were evicted, runs in full (`EditPath.FULL`).

The extension's hooks (`runner.Extension`) are where all of this happens:

- `prepare`: a request whose params carry an `EditSpec` gets its `EditState` (kind, masks,
  the template's noised latents) and its starting latents;
- `denoising`: around each batched call, the per-row plans for the masked UNet (edits whose
  cached steps are gone fall back to full compute here, once, before the call);
- `after_step`: latents outside the mask become the template's for the next step;
- `finish`: a recording records its decode's group-norm sums (`crop_decode.NormStats`), marks
  its template ready and returns no images; an edit returns the composite, decoding only its
  mask's neighbourhood when it has a template and the crop is small (`crop_decode`).

Templates are added and dropped on the engine's loop thread (`TemplateService`), so the HTTP
layer never touches the registry, the cache or the masked UNet.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from stepfleet.serving.backbones.base import Backbone, SetsTimesteps
from stepfleet.serving.contracts import EditPath
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.crop_decode import (
    CropBox,
    CropDecode,
    NormStats,
    crop_box,
    decode_edit,
    recording_norm_stats,
    vae_decoder,
)
from stepfleet.serving.edits.masked_dit import MaskedDiT
from stepfleet.serving.edits.masked_unet import EditRow, MaskedUNet, RecordRow, Row, expand_rows
from stepfleet.serving.edits.masks import TokenMasks, composite, default_halo, latent_mask
from stepfleet.serving.edits.templates import Template, TemplateKey, TemplateRegistry, TemplateState
from stepfleet.serving.params import EditSpec, GenerationParams
from stepfleet.serving.schedulers import add_noise, init_noise_sigma, make_scheduler

if TYPE_CHECKING:
    from stepfleet.serving.contracts import ImageBatch
    from stepfleet.serving.runner import RequestState


def masked_compute_for(denoiser: torch.nn.Module, cache: TemplateCache,
                       conv_halo: int | None = None) -> MaskedUNet | MaskedDiT:
    """The denoiser's masked compute: `MaskedUNet` for a UNet, `MaskedDiT` for an SD3/Flux transformer
    (each raises NotImplementedError on a model it does not know). `conv_halo`: windowed
    latent-resolution convolutions for UNet edits (`windowed_convs`; None: off)."""
    from diffusers import UNet2DConditionModel

    if isinstance(denoiser, UNet2DConditionModel):
        return MaskedUNet(denoiser, cache, conv_halo=conv_halo)
    return MaskedDiT(denoiser, cache)


class EditKind(enum.Enum):
    RECORD = "record"  # a template's registration: full compute, activations stored
    CACHED = "cached"  # an edit by masked compute on the template's activations
    FULL = "full"  # an edit by full compute (still blended with the template outside the mask)


@dataclass(eq=False)
class EditState:
    """One edit's (or recording's) state beside the runner's `RequestState`."""

    kind: EditKind
    #: The latents outside the mask before step i (noised[i]) and at the end (noised[-1]).
    noised: list[torch.Tensor]
    latent_mask: torch.Tensor  # (1, 1, h, w) bool, True = may change
    template_id: str | None = None
    template_rows: int = 1
    token_masks: TokenMasks | None = None
    pixel_mask: object = None  # (H, W) bool, for the composite after decoding
    base_image: object = None  # PIL image whose pixels are kept outside the mask
    norm_stats: NormStats | None = None  # the template's decode statistics: a crop decode may stand in

    def row_plan(self, state: RequestState) -> RecordRow | EditRow | None:
        if self.kind is EditKind.RECORD:
            assert self.template_id is not None
            return RecordRow(self.template_id, state.step_index)
        if self.kind is EditKind.CACHED:
            assert self.template_id is not None and self.token_masks is not None
            return EditRow(self.template_id, state.step_index, self.token_masks)
        return None


def template_key(params: GenerationParams, seed: int, spec: EditSpec) -> TemplateKey:
    return TemplateKey(params.width, params.height, params.num_inference_steps, params.scheduler,
                       float(params.guidance_scale), seed, float(spec.strength))


class EditExtension:
    """Edits and template recordings: masked compute on a UNet (`MaskedUNet`) or an SD3/Flux transformer
    (`MaskedDiT`); a backbone without `masked_compute` edits by full compute only."""

    def __init__(self, backbone: Backbone, cache: TemplateCache, templates: TemplateRegistry | None = None,
                 halo: int | None = None, crop: CropDecode | None = None, conv_halo: int | None = None) -> None:
        """`halo`: tokens recomputed around an edit at every attention resolution (`masks`);
        None picks `masks.default_halo` for each edit's latent size. `crop`: how an edit decodes
        only its mask's neighbourhood (`crop_decode`; None: its defaults). `conv_halo`: cells
        around the mask's box in which a UNet edit computes its latent-resolution convolutions
        (`windowed_convs`; None: everywhere)."""
        self.backbone = backbone
        self.cache = cache
        self.halo = halo
        self.crop = crop or CropDecode(max_fraction=0.0)  # off unless asked for (an approximation)
        # The VAE decoder a crop decode cuts (None: every edit decodes in full).
        vae = getattr(backbone, "decode_vae", None) or getattr(getattr(backbone, "pipe", None), "vae", None)
        self.decoder = vae_decoder(vae) if self.crop.max_fraction > 0 else None
        self.templates = templates or TemplateRegistry()
        # A family without masked compute still edits, by full compute (`EditPath.FULL`, said in
        # X-Stepfleet-Edit-Path): never the cached path, never a wrong image.
        self.masked: MaskedUNet | MaskedDiT | None = (masked_compute_for(backbone.denoiser, cache, conv_halo)
                                                      if backbone.capabilities.masked_compute else None)
        self._states: weakref.WeakKeyDictionary[RequestState, EditState] = weakref.WeakKeyDictionary()

    def close(self) -> None:
        """Uninstall masked compute from the denoiser (the cache stays its owner's to close)."""
        if self.masked is not None:
            self.masked.uninstall()

    # -- templates (call on the engine's loop thread; see TemplateService) -------------------
    def add_template(self, template: Template) -> None:
        for old in self.templates.add(template):
            self.cache.drop(old.id)

    def drop_template(self, template_id: str) -> bool:
        found = self.templates.remove(template_id) is not None
        self.cache.drop(template_id)
        return found

    def template_cached(self, template: Template) -> bool:
        steps = len(template.noised) - 1 if template.noised else template.key.steps
        return self.cache.complete(template.id, steps)

    def edit_state(self, state: RequestState) -> EditState | None:
        return self._states.get(state)

    # -- hooks ----------------------------------------------------------------------------
    def prepare(self, state: RequestState) -> None:
        spec = state.params.edit
        if spec is None:
            return
        params = state.params
        seed = int(state.generator.initial_seed())
        if spec.strength < 1.0:  # as the img2img/inpaint pipelines' get_timesteps
            steps = params.num_inference_steps
            keep = min(int(steps * spec.strength), steps)
            start = (steps - keep) * getattr(state.scheduler, "order", 1)
            state.timesteps = state.scheduler.timesteps[start:]
            if hasattr(state.scheduler, "set_begin_index"):
                state.scheduler.set_begin_index(start)
            if len(state.timesteps) == 0:
                raise ValueError(f"strength {spec.strength} leaves no denoising steps")
        c, h, w = state.shape
        device, dtype = state.latents.device, state.latents.dtype
        template = self.templates.get(spec.template_id) if spec.template_id else None
        if spec.template_id and template is None:
            raise KeyError(f"template {spec.template_id!r} is not registered")
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((params.n, c, h, w), generator=torch.Generator(device="cpu").manual_seed(seed),
                             device=device, dtype=dtype)
        if spec.record:
            assert template is not None and params.n == 1
            x0 = self.backbone.encode_image(template.image).to(dtype)
            template.latents = x0
            template.noised = self._noised(params, state.timesteps, x0, noise[:1], spec.strength)
            template.template_rows = 2 if state.guided else 1
            self._states[state] = EditState(
                kind=EditKind.RECORD, noised=template.noised, template_id=template.id,
                template_rows=template.template_rows,
                latent_mask=torch.zeros((1, 1, h, w), dtype=torch.bool, device=device),
            )
            state.latents = template.noised[0].clone()
            return
        base = template.image if template is not None else spec.image
        lm = latent_mask(spec.pixel_mask, params.width // w)
        same = (template is not None and template.state is TemplateState.READY
                and template.key == template_key(params, seed, spec))
        if same:
            assert template is not None and template.noised is not None
            noised, x0 = template.noised, template.latents  # the template's own: exact outside the mask
        else:
            x0 = template.latents if template is not None and template.latents is not None else None
            if x0 is None:
                x0 = self.backbone.encode_image(base).to(dtype)
            noised = self._noised(params, state.timesteps, x0, noise[:1], spec.strength)
        if spec.strength >= 1.0:
            init = noise * init_noise_sigma(state.scheduler)
        else:
            init = add_noise(state.scheduler, x0.expand_as(noise), noise, state.timesteps[:1].repeat(params.n))
        stats = template.decode_stats if template is not None else None
        edit = EditState(kind=EditKind.FULL, noised=noised, latent_mask=lm[None, None].to(device),
                         pixel_mask=spec.pixel_mask, base_image=base,
                         norm_stats=stats if stats is not None and (stats.h, stats.w) == (h, w) else None)
        state.latents = torch.where(edit.latent_mask, init, noised[0])
        if same and spec.use_cache and self.masked is not None and self.template_cached(template):
            edit.kind, edit.template_id, edit.template_rows = EditKind.CACHED, template.id, template.template_rows
            halo = self.halo if self.halo is not None else default_halo(*lm.shape)
            edit.token_masks = TokenMasks.from_latent(lm, halo)
        state.edit_path = EditPath.CACHED if edit.kind is EditKind.CACHED else EditPath.FULL
        self._states[state] = edit

    def _noised(self, params: GenerationParams, timesteps: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                strength: float) -> list[torch.Tensor]:
        """The template's latents before each step (as the inpainting pipeline blends them), then x0."""
        sched = make_scheduler(params.scheduler, self.backbone.scheduler.config, type(self.backbone.scheduler))
        if isinstance(self.backbone, SetsTimesteps):  # the request's own schedule (flow matching's shift)
            c, h, w = x0.shape[1:]
            self.backbone.set_timesteps(sched, params.num_inference_steps, (int(c), int(h), int(w)))
        else:
            sched.set_timesteps(params.num_inference_steps, device=x0.device)
        out = []
        for i in range(len(timesteps)):
            if i == 0 and strength >= 1.0:
                out.append(noise * init_noise_sigma(sched))
            else:
                out.append(add_noise(sched, x0, noise, timesteps[i : i + 1]))
        out.append(x0)
        return out

    def _rows(self, batch: Sequence[RequestState]) -> list[Row]:
        rows: list[Row] = []
        for r in batch:
            edit = self._states.get(r)
            plan = edit.row_plan(r) if edit is not None else None
            rows += expand_rows(plan, r.images, r.guided, edit.template_rows if edit is not None else 1)
        return rows

    def denoising(self, batch: Sequence[RequestState]) -> AbstractContextManager[None]:
        rows = self._rows(batch)
        if self.masked is None or all(row is None for row in rows):
            return nullcontext()
        entries, missing = self.masked.fetch(rows)
        if missing:  # evicted from both cache tiers: those edits go on by full compute
            gone = {tid for tid, _ in missing}
            for r in batch:
                edit = self._states.get(r)
                if edit is not None and edit.kind is EditKind.CACHED and edit.template_id in gone:
                    edit.kind, r.edit_path = EditKind.FULL, EditPath.FULL
            rows = self._rows(batch)
        return self.masked.active(rows, entries)

    def after_step(self, state: RequestState, latents: torch.Tensor) -> torch.Tensor:
        edit = self._states.get(state)
        if edit is None:
            return latents
        following = edit.noised[state.step_index + 1]
        if edit.kind is EditKind.RECORD:  # the template keeps its own (noised) latents everywhere
            return following
        return torch.where(edit.latent_mask, latents, following)

    def _crop(self, edit: EditState) -> CropBox | None:
        """The latent crop this edit decodes, or None to decode in full (no decoder to cut, no template
        statistics, or a crop that would be most of the image)."""
        if self.decoder is None or edit.norm_stats is None:
            return None
        return crop_box(edit.latent_mask, replace(self.crop, block=edit.norm_stats.block))

    def finish(self, state: RequestState, decode: Callable[[], ImageBatch]) -> ImageBatch | None:
        edit = self._states.get(state)  # kept (weakly) while the state lives: decoding again gives the same
        if edit is None:
            return None
        if edit.kind is EditKind.RECORD:  # nothing to show: the template is now ready for edits
            template = self.templates.get(edit.template_id or "")
            if template is not None:
                if self.decoder is not None and state.latents.shape[0] == 1:  # its latents (noised[-1]) decoded once
                    stats = NormStats(*state.latents.shape[-2:])
                    with recording_norm_stats(self.decoder, stats):
                        decode()
                    template.decode_stats = stats
                template.state = TemplateState.READY
            return []
        box = self._crop(edit)
        if box is not None:  # only the mask's neighbourhood is decoded; the template's pixels elsewhere
            assert self.decoder is not None and edit.norm_stats is not None
            inner = crop_box(edit.latent_mask, CropDecode(margin=0, max_fraction=1.0, block=edit.norm_stats.block))
            return decode_edit(decode, self.decoder, box, edit.base_image, edit.pixel_mask,
                               int(state.latents.shape[-2]), edit.norm_stats, inner)
        images = decode()
        if isinstance(images, list):
            return [composite(im, edit.base_image, edit.pixel_mask) for im in images]
        import numpy as np

        base = np.asarray(edit.base_image.convert("RGB"), dtype=np.float32) / 255.0
        return np.stack([composite(im, base, edit.pixel_mask) for im in images])
