"""Edits inside the step-level engine: the cached path, exact pixels outside the mask, mixing with generations.

Templates are registered by a RECORD run; an edit with the template's settings runs on the
cached activations ("cached"), any other by full compute ("full"), both inpainting-style.
Every test runs for each family with masked compute (SD 1.x and SDXL), with and without windowed
convolutions (`edits.windowed_convs`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepfleet.serving.contracts import EditPath, RequestKind
from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.extension import EditExtension
from stepfleet.serving.edits.templates import (
    Template,
    TemplateKey,
    TemplateState,
    image_digest,
    record_params,
)
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.params import EditSpec, GenerationParams
from stepfleet.serving.runner import ModelRunner

SIZE = 128
STEPS = 4
CACHED, FULL = EditPath.CACHED, EditPath.FULL


@pytest.fixture(scope="module", params=[("tiny_backbone", None), ("sdxl_backbone", None), ("tiny_backbone", 2),
                                        ("sdxl_backbone", 2)],
                ids=["sd", "sdxl", "sd-windowed", "sdxl-windowed"])
def edit_runner(request):
    name, conv_halo = request.param
    backbone = request.getfixturevalue(name)
    cache = TemplateCache(max_bytes=256 << 20)
    edits = EditExtension(backbone, cache, conv_halo=conv_halo)
    if conv_halo is not None:
        assert edits.masked.windows is not None  # both UNets are windowed (`edits.windowed_convs`)
    r = ModelRunner(backbone, extensions=[edits])
    r.edits = edits  # for the tests' convenience
    yield r
    edits.close()
    cache.close()


def template_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def box_mask(ratio: float) -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    side = round(SIZE * ratio**0.5)
    m[10 : 10 + side, 20 : 20 + side] = True
    return m


def register(runner, tid="t1", seed=3, guidance=7.5, scheduler="ddim", image=None):
    image = image or template_image()
    key = TemplateKey(SIZE, SIZE, STEPS, scheduler, guidance, seed)
    t = Template(id=tid, key=key, prompt="a template", image=image, digest=image_digest(image))
    runner.edits.add_template(t)
    r = runner.prepare(record_params(t), seed).state
    for _ in range(STEPS):
        runner.step([r])
    assert runner.decode(r).images == []
    assert t.state is TemplateState.READY and runner.edits.template_cached(t)
    return t


def edit(tid, mask, prompt="an edit", seed=3, guidance=7.5, scheduler="ddim", use_cache=True, n=1):
    return GenerationParams(prompt=prompt, width=SIZE, height=SIZE, n=n, num_inference_steps=STEPS,
                            guidance_scale=guidance, scheduler=scheduler, seed=seed,
                            edit=EditSpec(template_id=tid, pixel_mask=mask, use_cache=use_cache))


def solo(runner, params):
    r = runner.prepare(params, params.seed).state
    while r.steps_left:
        runner.step([r])
    return r


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_all_edit_mask_cached_equals_full_compute(edit_runner):
    register(edit_runner, "full-mask")
    everything = torch.ones(SIZE, SIZE, dtype=torch.bool)
    cached = solo(edit_runner, edit("full-mask", everything))
    full = solo(edit_runner, edit("full-mask", everything, use_cache=False))
    assert cached.edit_path is CACHED and full.edit_path is FULL
    assert rel(cached.latents, full.latents) <= 1e-4
    # ... and the edit is not the template: the prompt changed what was computed.
    assert rel(cached.latents, edit_runner.edits.templates.get("full-mask").latents) > 0.05


def test_template_pixels_kept_exactly_outside_the_mask(edit_runner):
    t = register(edit_runner, "exact")
    mask = box_mask(0.25)
    for params in (edit("exact", mask), edit("exact", mask, guidance=3.0)):  # cached, then a settings mismatch
        r = solo(edit_runner, params)
        assert r.edit_path is (CACHED if params.guidance_scale == 7.5 else FULL)
        out = np.asarray(edit_runner.decode(r).images[0])
        base = np.asarray(t.image)
        outside = ~mask.numpy()
        assert np.array_equal(out[outside], base[outside])
        assert not np.array_equal(out[~outside], base[~outside])


def test_evicted_template_falls_back_to_full_compute(edit_runner):
    register(edit_runner, "evicted")
    edit_runner.edits.cache.drop("evicted")
    r = solo(edit_runner, edit("evicted", box_mask(0.1)))
    assert r.edit_path is FULL
    # Evicted mid-run: the remaining steps run in full, and say so.
    register(edit_runner, "midway")
    r = edit_runner.prepare(edit("midway", box_mask(0.1)), 3).state
    assert r.edit_path is CACHED
    edit_runner.step([r])
    edit_runner.edits.cache.drop("midway")
    for _ in range(STEPS - 1):
        edit_runner.step([r])
    assert r.edit_path is FULL


def test_edits_and_generations_in_one_engine_batch_equal_their_solo_runs(edit_runner):
    register(edit_runner, "mix")
    requests = [
        edit("mix", box_mask(0.1), prompt="small edit"),
        edit("mix", box_mask(0.5), prompt="big edit", n=2),
        GenerationParams(prompt="a generation", width=SIZE, height=SIZE, num_inference_steps=STEPS + 2,
                         scheduler="euler", seed=8),
        edit("mix", box_mask(0.25), prompt="other settings", scheduler="euler"),  # full compute
    ]
    expected = [solo(edit_runner, p).latents.clone() for p in requests]
    batches: list[int] = []
    step = edit_runner.step

    def recording_step(batch):
        batches.append(len(batch))
        step(batch)

    engine = Engine(edit_runner, EngineConfig(max_batch=8))
    engine.keep_latents = True
    edit_runner.step = recording_step
    try:
        engine.start()
        futures = [engine.submit(p, kind=RequestKind.EDIT if p.edit else RequestKind.GENERATION).future
                   for p in requests]
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.stop(drain=False, timeout=5)
        del edit_runner.step
    assert max(batches) == len(requests)  # all four shared steps
    assert [r.edit_path for r in results] == [CACHED, CACHED, None, FULL]
    for got, want in zip(results, expected, strict=True):
        assert rel(got.latents, want) < 1e-4
