"""SD3 and Flux, the DiT families: the built-in tiny models and the engine's invariants for them.

As `test_sdxl_backbone.py` does for SDXL:
- `tiny-sd3`/`tiny-flux` round-trip through `from_pretrained` with their seeded weights, and
  `sd3-random`/`flux-random` have SD3-medium's / FLUX.1-dev's parameter counts;
- a request run by the runner equals `StableDiffusion3Pipeline` / `FluxPipeline` run alone;
- a request inside a mixed batch (other prompts, step counts, seeds, guidance, schedulers, n)
  equals the pipeline run alone, ≤ 1e-4 relative in float32;
- the schedule's resolution-dependent shift is the pipelines' (and does change the schedule);
- what a DiT cannot serve (a size off its patch grid, a scheduler of the other kind) is a 400
  naming the field, through the worker's HTTP too.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from stepfleet.serving.params import GenerationParams, InvalidParam
from stepfleet.serving.schedulers import make_scheduler

SIZE = 128  # 16x16 latents, 8x8 = 64 image tokens
TOL = 1e-4  # max relative difference; float32 on CPU, batch size changes summation order only


def gp(prompt="a red cat", steps=4, scheduler=None, n=1, guidance=4.0, seed=0, negative=None, width=SIZE,
       height=SIZE) -> GenerationParams:
    return GenerationParams(prompt=prompt, width=width, height=height, n=n, num_inference_steps=steps,
                            scheduler=scheduler, guidance_scale=guidance, negative_prompt=negative, seed=seed)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_solo(runner, params: GenerationParams):
    state = runner.prepare(params, params.seed).state
    while state.steps_left:
        runner.step([state])
    return runner.decode(state, keep_latents=True, output_type="np")


def run_pipeline(pipe, params: GenerationParams) -> np.ndarray:
    """diffusers' own pipeline, alone, with the request's settings and seed."""
    original = pipe.scheduler
    try:
        if params.scheduler is not None:
            pipe.scheduler = make_scheduler(params.scheduler, original.config, type(original))
        extra = {"negative_prompt": params.negative_prompt} if type(pipe).__name__.startswith("StableDiffusion3") else {}
        return pipe(params.prompt, height=params.height, width=params.width, num_images_per_prompt=params.n,
                    num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                    generator=torch.Generator().manual_seed(params.seed), output_type="np", **extra).images
    finally:
        pipe.scheduler = original


@pytest.fixture(scope="module")
def sd3():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model("tiny-sd3", device="cpu")
    return model, ModelRunner(load_backbone(model))


@pytest.fixture(scope="module")
def flux():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model("tiny-flux", device="cpu")
    return model, ModelRunner(load_backbone(model))


# -- the built-in models -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_tiny_dits_round_trip_through_from_pretrained(name, sd3, flux, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from stepfleet.serving.builtin_dit import modules, tokenizers

    model, runner = sd3 if name == "tiny-sd3" else flux
    pipe, backbone = model.pipeline, runner.backbone
    assert isinstance(pipe, StableDiffusion3Pipeline if name == "tiny-sd3" else FluxPipeline)
    assert model.family == backbone.family == name.removeprefix("tiny-")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.vae_scale_factor == 8
    assert backbone.default_size == (256, 256) and backbone.latent_shape(256, 192) == (16, 24, 32)
    assert backbone.capabilities.masked_compute and backbone.capabilities.prediction_type == "flow"
    assert backbone.capabilities.guidance is (name == "tiny-sd3")  # Flux: embedded guidance, no CFG rows
    # The T5 tokenizer was built locally (tokenizer.json) and loads back as a fast tokenizer.
    t5 = pipe.tokenizer_3 if name == "tiny-sd3" else pipe.tokenizer_2
    assert t5.is_fast and t5("a red cat").input_ids[-1] == t5.eos_token_id == 1
    clip, _, t5_tok = tokenizers(tmp_path / "tok")
    built = modules(name, clip, t5_tok)
    for part, module in built.items():
        loaded = getattr(pipe, part).state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(loaded[key], value), f"{part}.{key}"


def test_random_dits_have_the_real_architectures(tmp_path):
    """Parameter counts of SD3-medium's and FLUX.1-dev's components, on the `meta` device."""
    from stepfleet.serving.builtin_dit import modules, tokenizers
    from stepfleet.serving.builtin_models import BUILTIN_MODELS, BUILTIN_VERSIONS

    assert {"tiny-sd3", "tiny-flux", "sd3-random", "flux-random"} <= set(BUILTIN_MODELS) & set(BUILTIN_VERSIONS)
    clip, _, t5 = tokenizers(tmp_path / "tok")
    counts = {}
    for name in ("sd3-random", "flux-random"):
        with torch.device("meta"):
            mods = modules(name, clip, t5)
        counts[name] = {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items() if m is not None}
    assert counts["sd3-random"]["transformer"] == 2_028_328_000  # SD3 medium's MMDiT
    assert counts["flux-random"]["transformer"] == 11_901_408_320  # FLUX.1-dev
    assert counts["flux-random"]["text_encoder_2"] == 4_762_310_656  # T5-XXL's encoder
    assert counts["sd3-random"]["text_encoder_2"] == 694_659_840 and "text_encoder_3" not in counts["sd3-random"]
    assert counts["flux-random"]["vae"] == counts["sd3-random"]["vae"] == 83_819_683


@pytest.mark.parametrize(("model", "family"), [("tiny-sd3", "flux"), ("tiny-flux", "sd3")])
def test_family_mismatch_is_refused(model, family):
    from stepfleet.serving.backbones import FamilyMismatch
    from stepfleet.serving.loading import load_model

    with pytest.raises(FamilyMismatch) as err:
        load_model(model, device="cpu", family=family)
    assert repr(family) in str(err.value) and model in str(err.value)


# -- the schedule ------------------------------------------------------------------------------
def test_resolution_dependent_shift_matches_the_pipelines(flux, sd3):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift

    from stepfleet.serving.backbones.flow import calculate_shift

    for seq in (64, 256, 1024, 4096):
        assert calculate_shift(seq) == flux_shift(seq)
    runner = flux[1]
    small = runner.new_scheduler(None, 4, runner.latent_shape(128, 128)).timesteps
    large = runner.new_scheduler(None, 4, runner.latent_shape(512, 512)).timesteps
    assert small[0] == large[0] == 1000 and (large[1:] > small[1:] + 1).all()  # more tokens, more shift
    # SD3's fixed shift: the same schedule at every size.
    sd3_runner = sd3[1]
    assert torch.equal(sd3_runner.new_scheduler(None, 4, (16, 16, 16)).timesteps,
                       sd3_runner.new_scheduler(None, 4, (16, 64, 64)).timesteps)


# -- equal to diffusers' pipelines -------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        gp(n=2, negative="blurry", seed=11),
        gp(guidance=1.0, seed=3, width=192, height=128),  # unguided, non-square
        gp(scheduler="flow_heun", steps=3, seed=5),  # order 2: 2·steps-1 transformer calls
    ],
    ids=["guided-n2-negative", "unguided-nonsquare", "heun"],
)
def test_sd3_request_equals_pipeline(sd3, params):
    model, runner = sd3
    ours = run_solo(runner, params).images
    expected = run_pipeline(model.pipeline, params)
    assert ours.shape == expected.shape == (params.n, params.height, params.width, 3)
    assert rel(ours, expected) <= TOL


@pytest.mark.parametrize(
    "params",
    [gp(n=2, guidance=3.5, seed=11), gp(guidance=1.0, seed=2, width=128, height=192), gp(steps=6, seed=4, width=256)],
    ids=["n2", "nonsquare", "wide-more-tokens"],
)
def test_flux_request_equals_pipeline(flux, params):
    model, runner = flux
    ours = run_solo(runner, params).images
    expected = run_pipeline(model.pipeline, params)
    assert ours.shape == expected.shape == (params.n, params.height, params.width, 3)
    assert rel(ours, expected) <= TOL


def _mixed(runner, target: GenerationParams, others: list[GenerationParams]):
    mixed = runner.prepare(target, target.seed).state
    companions = [runner.prepare(p, p.seed).state for p in others]
    for i in range(len(mixed.timesteps)):
        # Companions join at different steps and leave when done: the batch changes every step.
        batch = [mixed] + [c for j, c in enumerate(companions) if j <= i and c.steps_left]
        assert len({r.shape for r in batch}) == 1
        runner.step(batch)
    assert not mixed.steps_left and any(c.step_index for c in companions)
    return runner.decode(mixed, keep_latents=True, output_type="np")


def test_sd3_request_in_a_mixed_batch_equals_pipeline_alone(sd3):
    model, runner = sd3
    target = gp("a lighthouse at dusk", steps=6, seed=3, negative="fog", guidance=5.0)
    others = [
        gp("a forest", steps=8, seed=4, guidance=7.0),
        gp("unguided", steps=4, seed=5, guidance=1.0),
        gp("two at once", steps=5, n=2, seed=6, guidance=3.0, scheduler="flow_heun"),
    ]
    out = _mixed(runner, target, others)
    assert rel(out.images, run_pipeline(model.pipeline, target)) <= TOL
    assert rel(out.latents, run_solo(runner, target).latents) <= TOL


def test_flux_request_in_a_mixed_batch_equals_pipeline_alone(flux):
    model, runner = flux
    target = gp("a lighthouse at dusk", steps=6, seed=3, guidance=3.5)
    others = [
        gp("a forest", steps=8, seed=4, guidance=5.0),
        gp("low guidance", steps=3, seed=5, guidance=1.0),
        gp("two at once", steps=5, n=2, seed=6, guidance=2.0),
    ]
    out = _mixed(runner, target, others)
    assert rel(out.images, run_pipeline(model.pipeline, target)) <= TOL
    # The guidance embedding reaches the transformer (else the equality above would be trivial).
    assert rel(run_solo(runner, gp(steps=3, guidance=1.0)).images, run_solo(runner, gp(steps=3)).images) > 1e-3


def test_flux_packing_round_trips():
    from stepfleet.serving.backbones.flux import pack, unpack

    x = torch.randn(3, 16, 8, 12)
    assert pack(x).shape == (3, 24, 64) and torch.equal(unpack(pack(x), 8, 12), x)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "params", "field"),
    [
        ("sd3", gp(width=200), "size"),  # a multiple of 8, but not of 16 (the patch grid)
        ("flux", gp(height=136), "size"),
        ("sd3", gp(scheduler="ddim"), "scheduler"),  # a noise-prediction scheduler on a flow model
        ("flux", gp(scheduler="euler_a"), "scheduler"),
        ("flux", gp(scheduler="flow_heun"), "scheduler"),  # cannot take Flux's sigmas and shift
    ],
)
def test_what_a_dit_cannot_serve_is_refused_naming_the_field(sd3, flux, family, params, field):
    runner = (sd3 if family == "sd3" else flux)[1]
    with pytest.raises(InvalidParam) as err:
        runner.prepare(params, 0)
    assert err.value.param == field


def test_a_flow_scheduler_on_a_unet_is_refused():
    from diffusers import DDIMScheduler

    with pytest.raises(InvalidParam) as err:
        make_scheduler("flow_euler", DDIMScheduler().config, DDIMScheduler)
    assert err.value.param == "scheduler" and "ddim" in err.value.message


# -- through the worker's HTTP -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_worker_serves_a_dit_over_http(name, serve_app):
    import httpx
    from openai import OpenAI
    from PIL import Image

    from stepfleet.serving.app import create_app
    from stepfleet.serving.settings import WorkerSettings

    settings = WorkerSettings(model=name, device="cpu", pool="dit", default_steps=3, warmup=False,
                              default_guidance_scale=3.5)
    with serve_app(create_app(settings)) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        result = client.images.generate(model=name, prompt="a small red boat", size="128x192", n=2,
                                        response_format="b64_json", extra_body={"seed": 7})
        assert len(result.data) == 2
        for item in result.data:
            img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
            assert img.format == "PNG" and img.size == (128, 192)
        for body, field in (({"size": "200x200"}, "size"), ({"scheduler": "ddim"}, "scheduler")):
            r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "seed": 1, **body}, timeout=60)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == field
        assert httpx.get(f"{base}/healthz").status_code == 200  # the worker goes on


def test_benchmarks_pick_schedulers_that_fit_the_model():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from stepfleet.serving.bench.edit_bench import EditBenchConfig, fitting_config
    from stepfleet.serving.bench.trace import SCHEDULER_MIX
    from stepfleet.serving.schedulers import fitting_mix

    assert fitting_mix(FlowMatchEulerDiscreteScheduler, SCHEDULER_MIX) == ("flow_euler",)
    assert fitting_mix(DDIMScheduler, SCHEDULER_MIX) == tuple(SCHEDULER_MIX)
    assert fitting_config(EditBenchConfig(), FlowMatchEulerDiscreteScheduler).scheduler == "flow_euler"
    assert fitting_config(EditBenchConfig(), DDIMScheduler).scheduler == "ddim"


def test_sd3_without_t5_loads_and_equals_its_pipeline(tmp_path):
    """T5 is optional in SD3 (`text_encoder_3=None`, as `sd3-random` is built): saved absent, it
    loads absent, and the T5 tokens are zeros as the pipeline makes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.builtin_dit import SD3_SCHEDULER_CONFIG, modules, tokenizers
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    clip, clip_g, t5 = tokenizers(tmp_path / "tok")
    parts = {**modules("tiny-sd3", clip, t5), "text_encoder_3": None}
    StableDiffusion3Pipeline(**parts, tokenizer=clip, tokenizer_2=clip_g, tokenizer_3=None,
                             scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
                             ).save_pretrained(str(tmp_path / "sd3-no-t5"))
    model = load_model(str(tmp_path / "sd3-no-t5"), device="cpu")
    assert model.family == "sd3" and model.pipeline.text_encoder_3 is None
    params = gp(steps=3, negative="blurry", seed=2)
    ours = run_solo(ModelRunner(load_backbone(model)), params).images
    assert rel(ours, run_pipeline(model.pipeline, params)) <= TOL


@pytest.mark.parametrize("method", ["vae", "projection"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_streamed_previews_of_a_dit_approach_the_final_image(family, method, sd3, flux):
    """Partial images come from flow matching's x0 = x_t - sigma·v (no alphas_cumprod); through the
    VAE, the last preview is closer to the final image than the first."""
    from stepfleet.serving.params import StreamSpec
    from stepfleet.serving.previews import PreviewExtension
    from stepfleet.serving.runner import ModelRunner

    backbone = (sd3 if family == "sd3" else flux)[1].backbone
    runner = ModelRunner(backbone, extensions=[PreviewExtension(backbone, method=method)])
    got: list[np.ndarray] = []
    params = GenerationParams(prompt="a red cat", width=SIZE, height=SIZE, num_inference_steps=8, guidance_scale=4.0,
                              seed=1, stream=StreamSpec(3, lambda i, images: got.append(np.asarray(images))))
    final = run_solo(runner, params).images
    assert len(got) == 3 and all(g.shape == (1, SIZE, SIZE, 3) for g in got)
    first, last = (np.abs(g.astype(np.float64) / (255 if g.dtype == np.uint8 else 1) - final).mean() for g in (got[0], got[-1]))
    if method == "vae":  # the linear projection fitted on a random-weight VAE approximates too little to rank
        assert last < first
