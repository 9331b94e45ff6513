"""Crop decoding of edits: only the mask's neighbourhood is decoded, the template's pixels elsewhere.

Checks the crop box (margin, block alignment, fallback), that unmasked pixels are the template's
exactly, that the crop decode of unchanged latents equals the full decode (the whole image's
GroupNorm statistics from the template), that a large or all-edit mask decodes in full (so an
all-edit cached edit still equals full compute), and that the crop really is all the up path sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepfleet.serving.contracts import EditPath
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.crop_decode import (
    CropBox,
    CropDecode,
    NormStats,
    crop_box,
    decode_edit,
    paste,
    recording_norm_stats,
)
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.edits.templates import Template, TemplateKey, image_digest, record_params
from stepfleet.serving.params import EditSpec, GenerationParams
from stepfleet.serving.runner import ModelRunner

SIZE = 256  # 32×32 latents: a small mask's crop is well under half of them
STEPS = 2


# -- the crop box and the paste (pure) -------------------------------------------------------
def test_crop_box_grows_by_the_margin_aligns_to_blocks_and_clips():
    m = torch.zeros(32, 32, dtype=torch.bool)
    m[10:13, 5:7] = True
    assert crop_box(m, CropDecode(margin=2, block=1)) == CropBox(8, 3, 15, 9)
    assert crop_box(m, CropDecode(margin=2, block=4)) == CropBox(8, 0, 16, 12)
    assert crop_box(m, CropDecode(margin=30, block=1, max_fraction=1.0)) == CropBox(0, 0, 32, 32)
    assert crop_box(torch.zeros(32, 32, dtype=torch.bool), CropDecode()) is None  # nothing edited


def test_crop_box_falls_back_to_full_decode_when_the_crop_is_most_of_the_latent():
    m = torch.zeros(32, 32, dtype=torch.bool)
    m[4:28, 4:28] = True
    assert crop_box(m, CropDecode(margin=0, max_fraction=0.5, block=1)) is None  # 576/1024 cells
    assert crop_box(m, CropDecode(margin=0, max_fraction=0.6, block=1)) == CropBox(4, 4, 28, 28)
    assert crop_box(m[:1, :1] | True, CropDecode(max_fraction=0.0)) is None  # 0: always full


@pytest.mark.parametrize("bad", [dict(margin=-1), dict(max_fraction=1.5), dict(block=0)])
def test_crop_setting_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        CropDecode(**bad)


def test_paste_keeps_every_unmasked_pixel_and_takes_the_crop_inside_the_mask():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:30, 18:26] = True
    box = CropBox(2, 2, 4, 4)  # latent cells → pixels 16:32 at scale 8
    crop = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = np.asarray(paste(crop, base, mask, box, 8))
    assert (out[~mask] == base[~mask]).all()
    assert (out[20:30, 18:26] == np.asarray(crop)[4:14, 2:10]).all()
    with pytest.raises(ValueError, match="does not match"):
        paste(crop, base, mask, CropBox(2, 2, 5, 4), 8)


# -- on a model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crop_runner(tiny_backbone):
    cache = TemplateCache(max_bytes=256 << 20)
    edits = EditExtension(backbone=tiny_backbone, cache=cache, crop=CropDecode())  # on (the worker's default is off)
    r = ModelRunner(tiny_backbone, extensions=[edits])
    r.edits = edits
    yield r
    edits.close()
    cache.close()


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE // 16, SIZE // 16, 3), dtype=np.uint8)).resize(
        (SIZE, SIZE), Image.BICUBIC)


@pytest.fixture(scope="module")
def template(crop_runner):
    image = _image()
    t = Template(id="crop", key=TemplateKey(SIZE, SIZE, STEPS, "ddim", 7.5, 3), prompt="a template",
                 image=image, digest=image_digest(image))
    crop_runner.edits.add_template(t)
    r = crop_runner.prepare(record_params(t), 3).state
    while r.steps_left:
        crop_runner.step([r])
    assert crop_runner.decode(r).images == []
    assert isinstance(t.decode_stats, NormStats) and (t.decode_stats.h, t.decode_stats.w) == (32, 32)
    return t


def _mask(top: int, left: int, side: int) -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[top : top + side, left : left + side] = True
    return m


def _edit(runner, mask, use_cache=True, output_type="np", crop=True):
    params = GenerationParams(prompt="an edit", width=SIZE, height=SIZE, n=1, num_inference_steps=STEPS,
                              guidance_scale=7.5, scheduler="ddim", seed=3,
                              edit=EditSpec(template_id="crop", pixel_mask=mask, use_cache=use_cache))
    r = runner.prepare(params, 3).state
    while r.steps_left:
        runner.step([r])
    decoder, runner.edits.decoder = runner.edits.decoder, (runner.edits.decoder if crop else None)
    try:
        return r, runner.decode(r, output_type=output_type).images
    finally:
        runner.edits.decoder = decoder


def _up_path_widths(decoder) -> list[int]:
    seen: list[int] = []
    h = decoder.up_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
    return seen, h


def test_cached_edit_decodes_only_the_crop_and_keeps_the_template_exactly_outside_the_mask(crop_runner, template):
    mask = _mask(100, 60, 40)  # latent cells 12..17 × 7..12; margin 4, blocks of 4: rows 8..24, columns 0..20
    seen, handle = _up_path_widths(crop_runner.edits.decoder)
    try:
        r, images = _edit(crop_runner, mask, output_type="pil")
    finally:
        handle.remove()
    assert r.edit_path is EditPath.CACHED
    assert seen == [20]  # the up path ran on the crop's 20 columns, not on all 32
    got = np.asarray(images[0])
    assert (got[~mask.numpy()] == np.asarray(template.image)[~mask.numpy()]).all()


def test_crop_decode_keeps_unmasked_pixels_of_the_full_decode_path(crop_runner, template):
    mask = _mask(100, 60, 40)
    _, crop = _edit(crop_runner, mask)
    _, full = _edit(crop_runner, mask, crop=False)
    m = mask.numpy()
    assert (crop[0][~m] == full[0][~m]).all()  # both the template's pixels there
    assert not np.array_equal(crop[0][m], full[0][m])  # inside: the crop's own (approximate) pixels


@pytest.fixture(scope="module")
def mini_sd():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model

    return load_backbone(load_model("mini-sd", device="cpu"))


@torch.inference_mode()
def test_crop_decode_error_on_the_trained_vae_is_bounded(mini_sd):
    """mini-sd's trained VAE (scale 4): a 256² picture with another painted into a tenth of it.
    Measured 29.4 dB with the template's statistics vs 27.7 dB with the crop's own."""
    from stepfleet.serving.bench.edit_bench import template_image
    from stepfleet.serving.bench.edit_replay import masked_psnr
    from stepfleet.serving.edits.crop_decode import vae_decoder

    decoder = vae_decoder(mini_sd.pipe.vae)
    image = template_image(256, seed=0)
    z0 = mini_sd.encode_image(image)
    stats = NormStats(64, 64)
    with recording_norm_stats(decoder, stats):
        mini_sd.decode(z0, output_type="np")
    lm = torch.zeros(64, 64, dtype=torch.bool)
    lm[24:44, 16:36] = True
    z = torch.where(lm, mini_sd.encode_image(template_image(256, seed=5)), z0)
    pm = lm.repeat_interleave(4, 0).repeat_interleave(4, 1)
    full = mini_sd.decode(z, output_type="np")[0]
    box = crop_box(lm, CropDecode(block=stats.block))
    inner = crop_box(lm, CropDecode(margin=0, block=stats.block, max_fraction=1.0))
    assert box is not None and box.cells < 0.5 * 64 * 64
    got = decode_edit(lambda: mini_sd.decode(z, output_type="np"), decoder, box, image, pm, 64, stats, inner)[0]
    own = decode_edit(lambda: mini_sd.decode(z, output_type="np"), decoder, box, image, pm, 64)[0]
    m = pm.numpy()
    assert masked_psnr(got, full, m) > 27.0
    assert masked_psnr(got, full, m) > masked_psnr(own, full, m) + 1.0


@torch.inference_mode()
def test_crop_decode_of_unchanged_latents_equals_the_full_decode(crop_runner, template):
    """With latents the template's own, the whole-image statistics are exact: only rounding is left."""
    backbone = crop_runner.edits.backbone
    decoder = crop_runner.edits.decoder
    z = template.noised[-1]
    full = backbone.decode(z, output_type="np")
    stats = NormStats(32, 32)
    with recording_norm_stats(decoder, stats):
        backbone.decode(z, output_type="np")
    lm = torch.zeros(32, 32, dtype=torch.bool)
    lm[12:18, 7:13] = True
    pm = lm.repeat_interleave(8, 0).repeat_interleave(8, 1)
    box = crop_box(lm, CropDecode(margin=8, block=stats.block, max_fraction=1.0))
    inner = crop_box(lm, CropDecode(margin=0, block=stats.block, max_fraction=1.0))
    got = decode_edit(lambda: backbone.decode(z, output_type="np"), decoder, box, template.image, pm, 32, stats,
                      inner)
    assert np.abs(got[0] - full[0])[pm.numpy()].max() < 1e-4
    own = decode_edit(lambda: backbone.decode(z, output_type="np"), decoder, box, template.image, pm, 32)
    assert np.abs(own[0] - full[0])[pm.numpy()].max() > 1e-3  # the statistics are what makes it exact


def test_large_and_all_edit_masks_decode_in_full_and_all_edit_equals_full_compute(crop_runner, template):
    seen, handle = _up_path_widths(crop_runner.edits.decoder)
    try:
        _, big = _edit(crop_runner, _mask(20, 20, 200))  # a crop of most of the latent: full decode
        everything = torch.ones(SIZE, SIZE, dtype=torch.bool)
        cached, a = _edit(crop_runner, everything)
        full, b = _edit(crop_runner, everything, use_cache=False)
    finally:
        handle.remove()
    assert seen == [32, 32, 32]
    assert cached.edit_path is EditPath.CACHED and full.edit_path is EditPath.FULL
    assert torch.allclose(cached.latents, full.latents, rtol=1e-4, atol=1e-4 * float(full.latents.abs().max()))
    assert np.abs(a - b).max() < 1e-3


def test_crop_decoding_is_off_unless_asked_for():
    """It is an approximation inside the mask (28-31 dB on the trained mini-sd VAE), so neither the
    worker nor a bare `EditExtension` decodes crops unless configured to."""
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.settings import WorkerSettings

    assert WorkerSettings().edit_crop_max_fraction == 0.0
    cache = TemplateCache(max_bytes=1 << 20)
    # its own backbone: crop_runner's extension has hooked the shared one
    edits = EditExtension(backbone=load_backbone(load_model("tiny-sd", device="cpu")), cache=cache)
    try:
        assert edits.crop.max_fraction == 0.0
    finally:
        edits.close()
        cache.close()


def test_an_edit_without_a_template_decodes_in_full(crop_runner):
    image = _image(1)
    params = GenerationParams(prompt="an edit", width=SIZE, height=SIZE, n=1, num_inference_steps=STEPS,
                              guidance_scale=7.5, scheduler="ddim", seed=3,
                              edit=EditSpec(image=image, pixel_mask=_mask(100, 60, 40)))
    r = crop_runner.prepare(params, 3).state
    while r.steps_left:
        crop_runner.step([r])
    seen, handle = _up_path_widths(crop_runner.edits.decoder)
    try:
        out = crop_runner.decode(r, output_type="pil").images
    finally:
        handle.remove()
    assert seen == [32]
    m = _mask(100, 60, 40).numpy()
    assert (np.asarray(out[0])[~m] == np.asarray(image)[~m]).all()


def test_a_two_image_edit_crop_decodes_each_image(crop_runner, template):
    mask = _mask(100, 60, 40)
    params = GenerationParams(prompt="an edit", width=SIZE, height=SIZE, n=2, num_inference_steps=STEPS,
                              guidance_scale=7.5, scheduler="ddim", seed=3,
                              edit=EditSpec(template_id="crop", pixel_mask=mask))
    r = crop_runner.prepare(params, 3).state
    while r.steps_left:
        crop_runner.step([r])
    seen, handle = _up_path_widths(crop_runner.edits.decoder)
    try:
        crop = crop_runner.decode(r, output_type="np").images
    finally:
        handle.remove()
    assert seen == [20] and crop.shape == (2, SIZE, SIZE, 3)
    decoder, crop_runner.edits.decoder = crop_runner.edits.decoder, None
    try:
        full = crop_runner.decode(r, output_type="np").images
    finally:
        crop_runner.edits.decoder = decoder
    m = mask.numpy()
    assert (crop[:, ~m] == full[:, ~m]).all()
    assert not np.array_equal(crop[0][m], crop[1][m])  # each image its own pixels


def test_the_measurement_tool_runs_and_reports_both_statistics():
    from stepfleet.training.measure_crop import measure

    res = measure("tiny-sd", 128, margins=[2], ratios=[0.25], places=1, reps=1)
    assert sorted(r["stats"] for r in res["results"]) == ["own", "template"]
    assert all(0 < r["crop_fraction"] <= 1 and r["masked_psnr_db"] > 0 for r in res["results"])
