"""SDXL, the second family: the built-in tiny model, and the engine's invariants for it.

As `test_runner_equivalence.py` does for SD 1.x:
- the built-in `tiny-sdxl` round-trips through `from_pretrained`, and a family mismatch is refused;
- a request run by the runner equals diffusers' `StableDiffusionXLPipeline` with the same seed,
  micro-conditioning included;
- a request inside a mixed batch (other steps, schedulers, guidance, micro-conditioning, n)
  equals its solo run, and a paused one equals an uninterrupted one;
- micro-conditioning reaches the UNet (so the equalities above are not trivial).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepfleet.serving.params import GenerationParams
from stepfleet.serving.schedulers import make_scheduler

SIZE = 128  # 16x16 latents: the same code paths as the default 256, a quarter of the time
TOL = 1e-4  # max relative difference; float32 on CPU, batch size changes summation order only


def gp(prompt="a red cat", steps=5, scheduler=None, n=1, guidance=7.5, seed=0, negative=None, width=SIZE,
       height=SIZE, original=None, crop=(0, 0), target=None) -> GenerationParams:
    return GenerationParams(prompt=prompt, width=width, height=height, n=n, num_inference_steps=steps,
                            scheduler=scheduler, guidance_scale=guidance, negative_prompt=negative, seed=seed,
                            original_size=original, crop_top_left=crop, target_size=target)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_solo(runner, params: GenerationParams, seed: int):
    state = runner.prepare(params, seed).state
    while state.steps_left:
        runner.step([state])
    return runner.decode(state, keep_latents=True, output_type="np")


def run_pipeline(pipe, params: GenerationParams, seed: int) -> np.ndarray:
    """diffusers' own SDXL pipeline, alone, with the request's settings and seed."""
    original = pipe.scheduler
    try:
        if params.scheduler is not None:
            pipe.scheduler = make_scheduler(params.scheduler, original.config, type(original))
        micro = {}
        if params.original_size is not None:
            micro["original_size"] = params.original_size
        if params.target_size is not None:
            micro["target_size"] = params.target_size
        if params.crop_top_left != (0, 0):
            micro["crops_coords_top_left"] = params.crop_top_left
        return pipe(params.prompt, negative_prompt=params.negative_prompt, height=params.height, width=params.width,
                    num_images_per_prompt=params.n, num_inference_steps=params.num_inference_steps,
                    guidance_scale=params.guidance_scale, generator=torch.Generator().manual_seed(seed),
                    output_type="np", **micro).images
    finally:
        pipe.scheduler = original


# -- the built-in model ----------------------------------------------------------------------
def test_tiny_sdxl_round_trips_through_from_pretrained(tiny_sdxl, sdxl_backbone, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from stepfleet.serving.backbones.sdxl import StableDiffusionXLBackbone
    from stepfleet.serving.builtin_models import sdxl_modules, sdxl_tokenizers

    pipe = tiny_sdxl.pipeline
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert tiny_sdxl.family == "sdxl" and isinstance(sdxl_backbone, StableDiffusionXLBackbone)
    assert sdxl_backbone.default_size == (256, 256) and pipe.vae_scale_factor == 8
    assert sdxl_backbone.latent_shape(256, 192) == (4, 24, 32)
    assert sdxl_backbone.capabilities.masked_compute and sdxl_backbone.capabilities.guidance
    # SDXL base 1.0's scheduler and VAE settings.
    sched = pipe.scheduler
    assert isinstance(sched, EulerDiscreteScheduler)
    assert (sched.config.timestep_spacing, sched.config.steps_offset, sched.config.beta_schedule) == (
        "leading", 1, "scaled_linear")
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.tokenizer_2.pad_token == "!" and pipe.config.force_zeros_for_empty_prompt
    # The weights on disk are the seeded build's, bit for bit.
    tok, tok2 = sdxl_tokenizers(tmp_path / "tok")
    built = sdxl_modules("tiny-sdxl", tok, tok2)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded = getattr(pipe, part).state_dict()
        for name, value in built[part].state_dict().items():
            assert torch.equal(loaded[name], value), f"{part}.{name}"


@pytest.mark.parametrize(("model", "family", "found"), [("tiny-sdxl", "sd15", "sdxl"), ("tiny-sd", "sdxl", "sd15")])
def test_family_mismatch_names_both(model, family, found):
    from stepfleet.serving.backbones import FamilyMismatch
    from stepfleet.serving.loading import load_model

    with pytest.raises(FamilyMismatch) as err:
        load_model(model, device="cpu", family=family)
    assert repr(family) in str(err.value) and found in str(err.value) and model in str(err.value)


def test_sdxl_random_has_sdxl_base_architecture(tmp_path):
    """Parameter counts of SDXL base 1.0's components, built on the `meta` device (no memory)."""
    from stepfleet.serving.builtin_models import BUILTIN_MODELS, sdxl_modules, sdxl_tokenizers

    assert {"tiny-sdxl", "sdxl-random"} <= set(BUILTIN_MODELS)
    tok, tok2 = sdxl_tokenizers(tmp_path / "tok")
    with torch.device("meta"):
        modules = sdxl_modules("sdxl-random", tok, tok2)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


def test_builtin_versions_name_cache_directories(tmp_path):
    from stepfleet.serving.builtin_models import (
        BUILTIN_MODELS,
        BUILTIN_VERSIONS,
        TINY_SD_VERSION,
        TRAINED_BUILTINS,
        ensure_builtin,
    )

    assert set(BUILTIN_VERSIONS) | set(TRAINED_BUILTINS) == set(BUILTIN_MODELS) and BUILTIN_VERSIONS["tiny-sd"] == TINY_SD_VERSION
    path = ensure_builtin("tiny-sdxl", tmp_path)
    assert path.name == f"tiny-sdxl-v{BUILTIN_VERSIONS['tiny-sdxl']}"
    assert ensure_builtin("tiny-sdxl", tmp_path) == path  # built once
    with pytest.raises(ValueError, match="unknown built-in"):
        ensure_builtin("tiny-nothing", tmp_path)


# -- conditioning ----------------------------------------------------------------------------
def test_conditioning_rows(sdxl_backbone):
    params = gp(n=2, width=128, height=96, original=(512, 384), crop=(8, 16))
    cond = sdxl_backbone.encode_prompt(params, guidance=True)
    assert set(cond.positive) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    for k, v in cond.positive.items():
        assert v.shape[0] == 2 and cond.negative[k].shape == v.shape, k
    assert cond.positive["encoder_hidden_states"].shape[-1] == 64  # both encoders' 32, concatenated
    # (height, width) order; target defaults to the request's own (height, width).
    assert cond.positive["time_ids"].tolist() == [[512, 384, 8, 16, 96, 128]] * 2
    assert torch.equal(cond.negative["time_ids"], cond.positive["time_ids"])
    # No negative prompt: SDXL's force_zeros_for_empty_prompt zeroes the negative rows ...
    assert not cond.negative["encoder_hidden_states"].any() and not cond.negative["text_embeds"].any()
    # ... an explicit one (even empty) is encoded; unguided requests have no negative rows.
    assert sdxl_backbone.encode_prompt(gp(negative=""), guidance=True).negative["text_embeds"].abs().sum() > 0
    assert sdxl_backbone.encode_prompt(gp(), guidance=False).negative is None


# -- equal to diffusers' pipeline --------------------------------------------------------------
@pytest.mark.parametrize("scheduler", [None, "ddim", "euler_a", "dpmpp_2m"])
def test_single_request_equals_diffusers_pipeline(sdxl_runner, tiny_sdxl, scheduler):
    params = gp(scheduler=scheduler, n=2, negative="blurry", original=(512, 384), crop=(8, 16), target=(256, 192))
    expected = run_pipeline(tiny_sdxl.pipeline, params, seed=11)
    ours = run_solo(sdxl_runner, params, seed=11).images
    assert ours.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert rel(ours, expected) <= TOL


@pytest.mark.parametrize(
    "params",
    [
        gp(width=128, height=96),  # non-square, default micro-conditioning: (height, width) order
        gp(guidance=1.0, scheduler="euler_a", seed=2),  # unguided
        gp(steps=4, n=3, guidance=3.0, scheduler="ddim", crop=(32, 0)),  # zero negative rows, n=3
    ],
    ids=["non-square-default", "unguided", "zero-negative-n3"],
)
def test_defaults_and_unguided_equal_diffusers_pipeline(sdxl_runner, tiny_sdxl, params):
    expected = run_pipeline(tiny_sdxl.pipeline, params, seed=5)
    ours = run_solo(sdxl_runner, params, seed=5).images
    assert ours.shape == expected.shape
    assert rel(ours, expected) <= TOL


# -- batching and preemption -----------------------------------------------------------------
def test_mixed_batch_equals_solo(sdxl_runner):
    target = gp("a lighthouse", steps=8, scheduler="euler_a", seed=3, original=(1024, 768), crop=(0, 64))
    others = [
        gp("a forest", steps=10, scheduler="ddim", seed=4, negative="fog", target=(64, 64)),
        gp("unguided", steps=5, scheduler="dpmpp_2m", guidance=1.0, seed=5),
        gp("two at once", steps=7, n=2, guidance=3.0, seed=6, original=(128, 512)),
    ]
    solo = run_solo(sdxl_runner, target, 3)
    mixed = sdxl_runner.prepare(target, 3).state
    companions = [sdxl_runner.prepare(p, p.seed).state for p in others]
    for i in range(target.num_inference_steps):
        # Companions join and leave at different steps, so the batch changes every step.
        batch = [mixed] + [c for j, c in enumerate(companions) if j <= i and c.steps_left]
        sdxl_runner.step(batch)
    assert not mixed.steps_left
    out = sdxl_runner.decode(mixed, keep_latents=True, output_type="np")
    assert rel(out.latents, solo.latents) <= TOL
    assert rel(out.images, solo.images) <= TOL


def test_paused_and_resumed_equals_uninterrupted(sdxl_runner):
    target = gp("paused", steps=8, scheduler="dpmpp_2m", seed=9, original=(512, 512))
    reference = run_solo(sdxl_runner, target, 9).latents
    state = sdxl_runner.prepare(target, 9).state
    for _ in range(3):
        sdxl_runner.step([state])
    # Paused: another request runs several steps; this one's tensors and scheduler are untouched.
    intruder = sdxl_runner.prepare(gp("urgent", steps=4, scheduler="dpmpp_2m", seed=1, crop=(16, 16)), 1).state
    for _ in range(4):
        sdxl_runner.step([intruder])
    while state.steps_left:
        sdxl_runner.step([state])
    assert rel(sdxl_runner.decode(state, keep_latents=True).latents, reference) <= 1e-5


def test_micro_conditioning_changes_the_image(sdxl_runner):
    """Otherwise the equalities above would hold even if time_ids never reached the UNet."""
    base = run_solo(sdxl_runner, gp(steps=4, seed=7), 7).images
    for changed in (gp(steps=4, seed=7, original=(1024, 1024)), gp(steps=4, seed=7, crop=(64, 0)),
                    gp(steps=4, seed=7, target=(64, 128))):
        assert rel(run_solo(sdxl_runner, changed, 7).images, base) > 1e-3  # measured 1.2-3.5 %


def test_float16_upcasts_the_vae_as_the_pipeline_does():
    """SDXL's VAE overflows in float16: decode in float32 as the pipeline does, from our own copy."""
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model("tiny-sdxl", device="cpu", dtype="float16")
    backbone = load_backbone(model)
    assert backbone.decode_vae is backbone.vae32 and backbone.vae32.dtype == torch.float32
    assert model.pipeline.vae.dtype == torch.float16  # the pipeline's own is left alone
    params = gp(steps=3, width=64, height=64, n=2, negative="noise", original=(256, 256))
    ours = run_solo(ModelRunner(backbone), params, 3)
    assert ours.latents.dtype == torch.float16
    assert rel(ours.images, run_pipeline(model.pipeline, params, 3)) <= TOL
    assert model.pipeline.vae.dtype == torch.float16


def test_masked_compute_on_the_sdxl_unet(tiny_sdxl):
    """`masked_compute=True` holds: SDXL's linear-projection, two-layer transformer blocks take
    masked compute; an all-edit mask, and a partial one on the template's own inputs, equal full compute."""
    from stepfleet.serving.edits.cache import TemplateCache
    from stepfleet.serving.edits.masked_unet import EditRow, MaskedUNet, RecordRow, expand_rows
    from stepfleet.serving.edits.masks import TokenMasks

    unet, lat = tiny_sdxl.pipeline.unet, 32

    def inputs(seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, lat, lat, generator=g).expand(2, -1, -1, -1).contiguous()
        added = {"text_embeds": torch.randn(2, 32, generator=g),
                 "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}
        return x, torch.randn(2, 77, 64, generator=g), added

    def full(x, t, e, added):
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added, return_dict=False)[0]

    cache = TemplateCache(max_bytes=64 << 20)
    masked = MaskedUNet(unet, cache)
    try:
        assert any(name.startswith("mid_block.attentions") for name in masked.block_names)
        t = torch.tensor([500.0, 500.0])
        x, e, added = inputs(1)
        ref = full(x, t, e, added)
        rec = masked(x, t, e, rows=expand_rows(RecordRow("tpl", 3), 1, cfg=True), added_cond_kwargs=added)
        assert torch.equal(rec, ref)
        box = torch.zeros(lat, lat, dtype=torch.bool)
        box[8:20, 4:16] = True
        part = masked(x, t, e, rows=expand_rows(EditRow("tpl", 3, TokenMasks.from_latent(box, halo=1)), 1, cfg=True),
                      added_cond_kwargs=added)
        assert rel(part, ref) <= TOL
        x2, e2, added2 = inputs(2)
        every = masked(x2, t, e2, rows=expand_rows(EditRow("tpl", 3, TokenMasks.full(lat, lat)), 1, cfg=True),
                       added_cond_kwargs=added2)
        assert rel(every, full(x2, t, e2, added2)) <= TOL
    finally:
        masked.uninstall()
        cache.close()
