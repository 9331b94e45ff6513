"""The Wan video backbone keeps the engine's numerical invariants (DESIGN.md).

- A video request run alone through the runner equals diffusers' `WanPipeline` with the same
  seed (frames, float32, <= 1e-4 relative); so does a one-frame (image) request.
- A video paused at step boundaries (not stepped while other work runs) and resumed equals the
  uninterrupted run; a video inside a batch of two equals its solo run.
- Sizes and frame counts the model cannot take are refused naming the field.
"""

import numpy as np
import pytest
import torch

from stepfleet.serving.params import GenerationParams, InvalidParam

SIZE = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def wan():
    from stepfleet.serving.loading import load_model

    return load_model("tiny-wan", device="cpu")


@pytest.fixture(scope="module")
def wan_runner(wan):
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.runner import ModelRunner

    return ModelRunner(load_backbone(wan))


def vp(prompt="a red cat", steps=4, frames=9, guidance=5.0, seed=0, negative=None, size=SIZE):
    return GenerationParams(prompt=prompt, width=size, height=size, num_inference_steps=steps, num_frames=frames,
                            guidance_scale=guidance, negative_prompt=negative, seed=seed)


def run_solo(runner, params, seed):
    r = runner.prepare(params, seed).state
    for _ in range(params.num_inference_steps):
        runner.step([r])
    return r


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(1e-12, np.abs(np.asarray(b)).max()))


@pytest.mark.parametrize("frames", [9, 1])
def test_request_alone_equals_wan_pipeline(wan, wan_runner, frames):
    params = vp(frames=frames, negative="blurry")
    expected = wan.pipeline(params.prompt, negative_prompt="blurry", height=SIZE, width=SIZE, num_frames=frames,
                            num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                            generator=torch.Generator().manual_seed(7), output_type="np").frames
    ours = wan_runner.decode(run_solo(wan_runner, params, seed=7), output_type="np").images
    if frames == 1:  # an image: (n, H, W, 3) as the image families return
        assert ours.shape == (1, SIZE, SIZE, 3)
        expected = expected[:, 0]
    else:
        assert ours.shape == expected.shape == (1, frames, SIZE, SIZE, 3)
    assert rel(ours, expected) <= TOL


def test_latents_alone_equal_wan_pipeline(wan, wan_runner):
    """Latents too (the decoded frames are clipped to [0, 1], which could hide a difference)."""
    params = vp(frames=5, steps=3, guidance=1.0)  # and without guidance
    expected = wan.pipeline(params.prompt, height=SIZE, width=SIZE, num_frames=5, num_inference_steps=3,
                            guidance_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="latent").frames
    ours = run_solo(wan_runner, params, seed=3).latents
    assert ours.shape == expected.shape == (1, 16, 2, SIZE // 8, SIZE // 8)
    assert rel(ours, expected) <= TOL


def test_paused_and_resumed_equals_uninterrupted(wan_runner):
    target = vp("paused video", steps=6, seed=9)
    reference = run_solo(wan_runner, target, 9).latents.clone()
    r = wan_runner.prepare(target, 9).state
    for _ in range(2):
        wan_runner.step([r])
    # Paused for several step boundaries: an image (another shape group) and another video run.
    image = wan_runner.prepare(vp("an urgent image", steps=3, frames=1, seed=1), 1).state
    other = wan_runner.prepare(vp("another video", steps=2, frames=5, seed=2), 2).state
    for _ in range(3):
        wan_runner.step([image])
    for _ in range(2):
        wan_runner.step([other])
    for _ in range(4):
        wan_runner.step([r])
    assert rel(r.latents, reference) <= 1e-5


def test_video_in_a_batch_equals_solo(wan_runner):
    target = vp("batched", steps=4, seed=4)
    solo = run_solo(wan_runner, target, 4).latents.clone()
    a = wan_runner.prepare(target, 4).state
    b = wan_runner.prepare(vp("companion", steps=6, guidance=3.0, seed=5), 5).state
    assert a.shape == b.shape == (16, 3, 8, 8)
    for _ in range(4):
        wan_runner.step([a, b])
    assert rel(a.latents, solo) <= TOL


def test_image_and_video_are_different_shape_groups(wan_runner):
    assert wan_runner.request_shape(vp(frames=1)) == (16, 1, 8, 8)
    assert wan_runner.request_shape(vp(frames=9)) == (16, 3, 8, 8)
    assert wan_runner.request_shape(vp(frames=None)) == wan_runner.latent_shape(SIZE, SIZE)


@pytest.mark.parametrize(("params", "field"), [(vp(frames=8), "num_frames"), (vp(size=72), "size")])
def test_shapes_the_model_cannot_take_name_the_field(wan_runner, params, field):
    with pytest.raises(InvalidParam) as err:
        wan_runner.prepare(params, 0)
    assert err.value.param == field


def test_wan_random_has_wan_2_1_t2v_1_3b_architecture():
    """Counted on the meta device (no memory): the 1.3B transformer, the Wan VAE, UMT5-XXL's encoder."""
    from stepfleet.serving.builtin_dit import t5_tokenizer
    from stepfleet.serving.builtin_video import WAN_RANDOM, modules

    with torch.device("meta"):
        mods = modules(WAN_RANDOM, t5_tokenizer())
    billions = {k: sum(p.numel() for p in m.parameters()) / 1e9 for k, m in mods.items()}
    assert 1.40 < billions["transformer"] < 1.44
    assert 0.12 < billions["vae"] < 0.13
    assert 5.6 < billions["text_encoder"] < 5.8
