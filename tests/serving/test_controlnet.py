"""ControlNet inside mixed step batches equals diffusers' ControlNet pipelines run alone.

- the built-in nets round-trip through `from_pretrained` with non-zero output convolutions;
- one request with a ControlNet (scale, guidance window) equals `StableDiffusionControlNetPipeline`;
- a mixed batch (net A, net B with n=2, none, A+B combined; different scales and windows) equals each
  request's pipeline run alone (MultiControlNet for A+B), and the uncontrolled one its plain run;
- the same for SDXL against `StableDiffusionXLControlNetPipeline`;
- control visibly changes the image (so none of the equalities above is trivial).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stepfleet.serving.params import ControlSpec, GenerationParams

SIZE = 128
STEPS = 4
TOL = 1e-4


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def edges(kind: int = 0, size: int = SIZE) -> Image.Image:
    """A synthetic control image: white outlines on black (what a canny map looks like)."""
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    if kind == 0:
        d.rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], outline=(255, 255, 255), width=3)
    else:
        d.ellipse([size // 8, size // 3, 7 * size // 8, 5 * size // 6], outline=(255, 255, 255), width=3)
    return im


def gp(controls=(), prompt="a red cat", guidance=7.5, n=1, scheduler=None, steps=STEPS) -> GenerationParams:
    return GenerationParams(prompt=prompt, width=SIZE, height=SIZE, n=n, num_inference_steps=steps,
                            guidance_scale=guidance, scheduler=scheduler, controlnet=tuple(controls))


def load_nets(tmp_dir) -> dict:
    """tiny-controlnet (built-in, through from_pretrained) and a second, differently seeded net."""
    from diffusers import ControlNetModel

    from stepfleet.serving.builtin_models import ensure_builtin
    from stepfleet.serving.controlnet.builtins import build_controlnet

    a = ControlNetModel.from_pretrained(str(ensure_builtin("tiny-controlnet")), local_files_only=True)
    b = ControlNetModel.from_pretrained(str(build_controlnet(tmp_dir / "b", "tiny-controlnet", seed=11)),
                                        local_files_only=True)
    return {"A": a.eval(), "B": b.eval()}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return load_nets(tmp_path_factory.mktemp("cn"))


@pytest.fixture(scope="module")
def cn_runner(tiny_backbone, nets):
    from stepfleet.serving.controlnet.extension import ControlNetExtension
    from stepfleet.serving.controlnet.registry import ControlNetRegistry, LoadedControlNet
    from stepfleet.serving.controlnet.spec import ControlNetEntry
    from stepfleet.serving.runner import ModelRunner

    registry = ControlNetRegistry([LoadedControlNet(ControlNetEntry(k, k, "canny"), v) for k, v in nets.items()])
    ext = ControlNetExtension(tiny_backbone, registry)
    return ModelRunner(tiny_backbone, extensions=[ext]), ext


def run_batch(runner, requests: list[tuple[GenerationParams, int]]) -> list[np.ndarray]:
    states = [runner.prepare(p, seed).state for p, seed in requests]
    while any(s.steps_left for s in states):
        runner.step([s for s in states if s.steps_left])
    return [runner.decode(s, output_type="np").images for s in states]


def run_pipeline(components, nets, params: GenerationParams, seed: int, sdxl: bool = False) -> np.ndarray:
    """diffusers' own ControlNet pipeline, alone (a MultiControlNet for two nets; plain without)."""
    from diffusers import (
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    comps = {k: v for k, v in components.items() if k not in ("safety_checker", "feature_extractor",
                                                                "image_encoder")}
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    common = dict(height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
                  guidance_scale=params.guidance_scale, num_images_per_prompt=params.n,
                  generator=torch.Generator().manual_seed(seed), output_type="np")
    if sdxl:
        extra = {"add_watermarker": False}
    if not params.controlnet:
        cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        return cls(**comps, **extra)(params.prompt, **common).images
    cs = params.controlnet
    cls = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
    one = len(cs) == 1
    pipe = cls(**comps, controlnet=nets[cs[0].name] if one else [nets[c.name] for c in cs], **extra)
    pick = (lambda xs: xs[0]) if one else list
    return pipe(params.prompt, image=pick([c.image for c in cs]),
                controlnet_conditioning_scale=pick([c.conditioning_scale for c in cs]),
                control_guidance_start=pick([c.guidance_start for c in cs]),
                control_guidance_end=pick([c.guidance_end for c in cs]), **common).images


# -- the built-ins ---------------------------------------------------------------------------------
def test_builtin_controlnets_round_trip_with_nonzero_outputs(nets, tmp_path):
    from diffusers import ControlNetModel

    from stepfleet.serving.builtin_models import ensure_builtin
    from stepfleet.serving.controlnet.builtins import VERSIONS

    a = nets["A"]
    for conv in [*a.controlnet_down_blocks, a.controlnet_mid_block, a.controlnet_cond_embedding.conv_out]:
        assert conv.weight.abs().sum() > 0  # diffusers would have zeros here
    path = ensure_builtin("tiny-controlnet-sdxl", tmp_path)
    assert path.name == f"tiny-controlnet-sdxl-v{VERSIONS['tiny-controlnet-sdxl']}"
    assert ensure_builtin("tiny-controlnet-sdxl", tmp_path) == path  # built once
    sdxl = ControlNetModel.from_pretrained(str(path), local_files_only=True)
    assert sdxl.config.addition_embed_type == "text_time" and sdxl.config.cross_attention_dim == 64
    assert not torch.equal(nets["A"].controlnet_mid_block.weight, nets["B"].controlnet_mid_block.weight)


def test_registry_refuses_a_net_of_another_family(tiny_model):
    from stepfleet.serving.controlnet.registry import ControlNetMismatch, ControlNetRegistry
    from stepfleet.serving.controlnet.spec import parse_registry

    with pytest.raises(ControlNetMismatch, match="cross_attention_dim"):
        ControlNetRegistry.load(parse_registry("tiny-controlnet-sdxl"), tiny_model.pipeline.unet)
    reg = ControlNetRegistry.load(parse_registry("canny=tiny-controlnet"), tiny_model.pipeline.unet)
    assert reg.names() == ("canny",) and reg.entries()[0].kind == "canny"


# -- SD 1.x ----------------------------------------------------------------------------------------
def test_solo_request_with_window_equals_the_controlnet_pipeline(cn_runner, tiny_model, nets):
    runner, _ = cn_runner
    params = gp([ControlSpec("A", edges(0), conditioning_scale=0.8, guidance_start=0.25, guidance_end=0.75)])
    [ours] = run_batch(runner, [(params, 3)])
    ref = run_pipeline(tiny_model.pipeline.components, nets, params, 3)
    assert rel(ours, ref) <= TOL


def test_mixed_batch_equals_each_pipeline_alone_and_control_changes_the_image(cn_runner, tiny_model, nets):
    runner, ext = cn_runner
    requests = [
        (gp([ControlSpec("A", edges(0), conditioning_scale=1.0)]), 1),
        (gp([ControlSpec("B", edges(1), conditioning_scale=0.5, guidance_start=0.25, guidance_end=0.75)],
            prompt="a blue house", guidance=5.0, n=2), 2),
        (gp(prompt="a green tree", n=2), 3),
        (gp([ControlSpec("A", edges(1), conditioning_scale=0.7, guidance_end=0.5),
             ControlSpec("B", edges(0), conditioning_scale=1.2, guidance_start=0.5)], prompt="a dog", guidance=1.0),
         4),
    ]
    runs_before = ext.stats["runs"]
    ours = run_batch(runner, requests)
    # Two nets, each once per step at most (never once per request).
    assert ext.stats["runs"] - runs_before <= 2 * STEPS
    for (params, seed), got in zip(requests, ours, strict=True):
        ref = run_pipeline(tiny_model.pipeline.components, nets, params, seed)
        assert rel(got, ref) <= TOL, params.prompt
    # Control visibly changes the image: request 0 against the same request without control.
    [plain] = run_batch(runner, [(gp(), 1)])
    assert float(np.abs(ours[0] - plain).mean()) > 0.01


# -- SDXL ------------------------------------------------------------------------------------------
def test_sdxl_mixed_batch_equals_the_sdxl_controlnet_pipeline(sdxl_backbone, tiny_sdxl, tmp_path):
    from diffusers import ControlNetModel

    from stepfleet.serving.builtin_models import ensure_builtin
    from stepfleet.serving.controlnet.builtins import build_controlnet
    from stepfleet.serving.controlnet.extension import ControlNetExtension
    from stepfleet.serving.controlnet.registry import ControlNetRegistry, LoadedControlNet
    from stepfleet.serving.controlnet.spec import ControlNetEntry
    from stepfleet.serving.runner import ModelRunner

    nets = {"X": ControlNetModel.from_pretrained(str(ensure_builtin("tiny-controlnet-sdxl")), local_files_only=True),
            "Y": ControlNetModel.from_pretrained(str(build_controlnet(tmp_path / "y", "tiny-controlnet-sdxl", seed=5)),
                                                 local_files_only=True)}
    registry = ControlNetRegistry([LoadedControlNet(ControlNetEntry(k, k), v.eval()) for k, v in nets.items()])
    runner = ModelRunner(sdxl_backbone, extensions=[ControlNetExtension(sdxl_backbone, registry)])
    requests = [
        (gp([ControlSpec("X", edges(0), conditioning_scale=0.9, guidance_start=0.25)]), 1),
        (gp([ControlSpec("X", edges(1)), ControlSpec("Y", edges(0), conditioning_scale=0.6, guidance_end=0.75)],
            prompt="a blue house"), 2),
        (gp(prompt="a green tree"), 3),
    ]
    ours = run_batch(runner, requests)
    for (params, seed), got in zip(requests, ours, strict=True):
        ref = run_pipeline(tiny_sdxl.pipeline.components, nets, params, seed, sdxl=True)
        assert rel(got, ref) <= TOL, params.prompt
    assert float(np.abs(ours[0] - ours[2]).mean()) > 0  # sanity: different requests differ
    [plain] = run_batch(runner, [(gp(), 1)])
    assert float(np.abs(ours[0] - plain).mean()) > 0.01


def test_controlled_requests_are_costed_as_their_own_variant(cn_runner):
    runner, _ = cn_runner
    assert runner.prepare(gp([ControlSpec("A", edges(0))]), 1).cost_variant == "controlnet"
    assert runner.prepare(gp(), 1).cost_variant is None
