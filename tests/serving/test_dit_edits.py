"""Edits on the DiT families (SD3, Flux) inside the runner: the cached path and its fallbacks.

- an edit of a registered template with its settings runs masked compute (`EditPath.CACHED`);
  with an all-edit mask it equals full compute; outside the mask the template's pixels are
  kept exactly, inside the edit changes them;
- an edit of an uploaded image, or of a template recorded with other settings, runs by full
  compute (`EditPath.FULL`), never a wrong image; an all-edit mask at strength 1 is then
  text-to-image and equals the family's pipeline run alone;
- strength < 1 noises the template as the flow-matching inpaint pipelines do (`scale_noise`);
- over HTTP, `X-Stepfleet-Edit-Path` says which path ran.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stepfleet.serving.contracts import EditPath
from stepfleet.serving.edits.templates import (
    Template,
    TemplateKey,
    TemplateState,
    image_digest,
    record_params,
)
from stepfleet.serving.params import EditSpec, GenerationParams

SIZE = 128
STEPS = 3
GUIDANCE = 3.0
SEED = 3


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def dit(request):
    """(loaded model, runner with the edits extension) for each DiT family."""
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.edits.cache import TemplateCache
    from stepfleet.serving.edits.extension import EditExtension
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model(request.param, device="cpu")
    backbone = load_backbone(model)
    cache = TemplateCache(max_bytes=64 << 20)
    edits = EditExtension(backbone, cache)
    runner = ModelRunner(backbone, extensions=[edits])
    runner.edits = edits
    yield model, runner
    edits.close()
    cache.close()


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def box(y0=16, x0=32, side=48) -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def edit(mask, template_id=None, image=None, strength=1.0, steps=STEPS, prompt="an edit",
         use_cache=True) -> GenerationParams:
    return GenerationParams(prompt=prompt, width=SIZE, height=SIZE, num_inference_steps=steps,
                            guidance_scale=GUIDANCE, seed=SEED,
                            edit=EditSpec(template_id=template_id, image=image, pixel_mask=mask, strength=strength,
                                          use_cache=use_cache))


def run(runner, params, output_type="np"):
    state = runner.prepare(params, params.seed).state
    while state.steps_left:
        runner.step([state])
    return state, runner.decode(state, output_type=output_type)


def register(runner, tid: str, image: Image.Image) -> Template:
    template = Template(id=tid, key=TemplateKey(SIZE, SIZE, STEPS, None, GUIDANCE, SEED), prompt="a template",
                       image=image, digest=image_digest(image))
    runner.edits.add_template(template)
    _, out = run(runner, record_params(template))
    assert out.images == [] and template.state is TemplateState.READY
    assert runner.edits.template_cached(template)
    return template


def test_a_registered_template_edits_on_the_cached_path_keeping_its_pixels(dit):
    _, runner = dit
    template = register(runner, "t", picture(1))
    mask = box()
    state, out = run(runner, edit(mask, template_id="t"), output_type="pil")
    assert state.edit_path is EditPath.CACHED
    got, base = np.asarray(out.images[0]), np.asarray(template.image)
    assert np.array_equal(got[~mask.numpy()], base[~mask.numpy()])
    assert not np.array_equal(got[mask.numpy()], base[mask.numpy()])
    # An all-edit mask: the cached path equals full compute.
    everything = torch.ones(SIZE, SIZE, dtype=torch.bool)
    cached, a = run(runner, edit(everything, template_id="t"))
    full, b = run(runner, edit(everything, template_id="t", use_cache=False))
    assert cached.edit_path is EditPath.CACHED and full.edit_path is EditPath.FULL
    assert float(np.abs(a.images - b.images).max() / np.abs(b.images).max()) <= 1e-4


def test_other_settings_fall_back_to_full_compute(dit):
    _, runner = dit
    register(runner, "u", picture(5))
    state, out = run(runner, edit(box(), template_id="u", steps=STEPS + 1))  # the template ran 3 steps
    assert state.edit_path is EditPath.FULL and np.isfinite(out.images).all()


def test_an_uploaded_image_with_an_all_edit_mask_equals_the_pipeline(dit):
    model, runner = dit
    state, out = run(runner, edit(torch.ones(SIZE, SIZE, dtype=torch.bool), image=picture()))
    assert state.edit_path is EditPath.FULL and out.edit_path is EditPath.FULL
    expected = model.pipeline("an edit", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                              generator=torch.Generator().manual_seed(SEED), output_type="np").images
    assert float(np.abs(out.images - expected).max() / np.abs(expected).max()) <= 1e-4


def test_strength_noises_the_template_as_scale_noise(dit):
    from stepfleet.serving.schedulers import add_noise

    _, runner = dit
    shape = runner.latent_shape(SIZE, SIZE)
    scheduler = runner.new_scheduler(None, 6, shape)
    reference = runner.new_scheduler(None, 6, shape)
    reference._begin_index = None  # `scale_noise` looks the timestep up only without a begin index
    x0, noise = torch.randn(1, *shape), torch.randn(1, *shape)
    for t in scheduler.timesteps:
        ours = add_noise(scheduler, x0, noise, t[None])
        assert torch.allclose(ours, reference.scale_noise(x0, t[None], noise), rtol=0, atol=1e-6)
    state, out = run(runner, edit(box(), image=picture(2), strength=0.5))
    assert len(state.timesteps) == int(STEPS * 0.5)  # as the inpaint pipelines' get_timesteps
    assert state.edit_path is EditPath.FULL and np.isfinite(out.images).all()


def test_the_worker_says_which_path_ran_over_http(serve_app):
    import httpx

    from stepfleet.serving.app import create_app
    from stepfleet.serving.settings import WorkerSettings

    settings = WorkerSettings(model="tiny-sd3", device="cpu", pool="dit", default_steps=STEPS, warmup=False,
                              template_cache_bytes=64 << 20)
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[16:64, 16:64] = 0  # the transparent box is the area to edit
    mask = Image.fromarray(np.dstack([np.zeros((SIZE, SIZE, 3), np.uint8), alpha]), "RGBA")

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    with serve_app(create_app(settings)) as base:
        r = httpx.post(f"{base}/v1/templates", files={"image": ("t.png", png(picture(4)), "image/png")},
                       data={"prompt": "a template", "num_inference_steps": str(STEPS), "seed": "4"}, timeout=120)
        assert r.status_code == 200, r.text
        tmpl = r.json()
        assert tmpl["status"] == "ready" and tmpl["cached"] is True
        r = httpx.post(f"{base}/v1/images/edits", files={"mask": ("m.png", png(mask), "image/png")},
                       data={"template_id": tmpl["id"], "prompt": "an edit"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-stepfleet-edit-path"] == "cached"
        r = httpx.post(f"{base}/v1/images/edits",
                       files={"image": ("i.png", png(picture(4)), "image/png"), "mask": ("m.png", png(mask), "image/png")},
                       data={"prompt": "an edit", "size": f"{SIZE}x{SIZE}", "num_inference_steps": str(STEPS + 1)},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-stepfleet-edit-path"] == "full"


def test_cached_edits_and_generations_in_one_batch_equal_their_solo_runs(dit):
    """One runner step mixes a cached edit, a full-compute edit and a generation: each equals its solo run."""
    _, runner = dit
    register(runner, "mix", picture(7))
    requests = [
        edit(box(), template_id="mix"),  # cached
        edit(box(8, 8, 32), template_id="mix", prompt="another edit"),  # cached, another mask
        edit(box(), image=picture(8)),  # full compute
        GenerationParams(prompt="a plain image", width=SIZE, height=SIZE, num_inference_steps=STEPS + 1,
                         guidance_scale=GUIDANCE, seed=9),
    ]
    solo = [run(runner, p)[0].latents for p in requests]
    states = [runner.prepare(p, p.seed).state for p in requests]
    assert [s.edit_path for s in states] == [EditPath.CACHED, EditPath.CACHED, EditPath.FULL, None]
    while any(s.steps_left for s in states):
        runner.step([s for s in states if s.steps_left])
    for state, alone in zip(states, solo, strict=True):
        assert float((state.latents - alone).abs().max() / alone.abs().max()) <= 1e-4
