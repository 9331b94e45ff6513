"""The engine's numerical invariants (DESIGN.md): batching and preemption never change a result.

- A request run by the engine equals diffusers' `StableDiffusionPipeline` with the same seed.
- A request inside a mixed batch (other prompts, steps, schedulers, guidance) equals its solo run.
- A request paused at a step boundary and resumed equals one that was never interrupted.
"""

import numpy as np
import pytest
import torch

from stepfleet.serving.params import GenerationParams
from stepfleet.serving.schedulers import make_scheduler

SIZE = 128  # 16x16 latents: the same code paths, a quarter of the time
TOL = 1e-4  # float32 on CPU; different batch sizes change summation order only


def gp(prompt="a red cat", steps=6, scheduler=None, n=1, guidance=7.5, seed=0, negative=None):
    return GenerationParams(prompt=prompt, width=SIZE, height=SIZE, n=n, num_inference_steps=steps,
                            scheduler=scheduler, guidance_scale=guidance, negative_prompt=negative, seed=seed)


def run_solo(runner, params, seed):
    r = runner.prepare(params, seed).state
    for _ in range(params.num_inference_steps):
        runner.step([r])
    return r


@pytest.mark.parametrize("scheduler", [None, "ddim", "euler", "euler_a", "dpmpp_2m", "lcm"])
def test_single_request_equals_diffusers_pipeline(runner, tiny_model, scheduler):
    pipe = tiny_model.pipeline
    original = pipe.scheduler
    params = gp(scheduler=scheduler, n=2, negative="blurry")
    try:
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, original.config, type(original))
        expected = pipe(params.prompt, negative_prompt="blurry", height=SIZE, width=SIZE, num_images_per_prompt=2,
                        num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                        generator=torch.Generator().manual_seed(11), output_type="np").images
    finally:
        pipe.scheduler = original
    ours = runner.decode(run_solo(runner, params, seed=11), output_type="np").images
    assert ours.shape == expected.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, expected, atol=TOL)


def test_mixed_batch_equals_solo(runner):
    target = gp("a lighthouse", steps=8, scheduler="euler_a", seed=3)
    others = [
        gp("a forest", steps=12, scheduler="ddim", seed=4),
        gp("unguided", steps=5, scheduler="dpmpp_2m", guidance=1.0, seed=5),
        gp("two at once", steps=7, scheduler="lcm", n=2, guidance=3.0, seed=6),
    ]
    solo = run_solo(runner, target, 3).latents.clone()
    mixed = runner.prepare(target, 3).state
    companions = [runner.prepare(p, p.seed).state for p in others]
    for i in range(target.num_inference_steps):
        # Companions join and leave at different steps, so the batch changes every step.
        batch = [mixed] + [c for j, c in enumerate(companions) if j <= i and c.step_index < len(c.timesteps)]
        runner.step(batch)
    rel = (mixed.latents - solo).abs().max() / solo.abs().max()
    assert rel < 1e-3


def test_paused_and_resumed_equals_uninterrupted(runner):
    target = gp("paused", steps=8, scheduler="dpmpp_2m", seed=9)
    reference = run_solo(runner, target, 9).latents.clone()
    r = runner.prepare(target, 9).state
    for _ in range(3):
        runner.step([r])
    # Paused: other requests run several steps; this one's tensors and scheduler are untouched.
    intruder = runner.prepare(gp("urgent", steps=4, scheduler="dpmpp_2m", seed=1), 1).state
    for _ in range(4):
        runner.step([intruder])
    for _ in range(5):
        runner.step([r])
    assert torch.allclose(r.latents, reference, atol=1e-5)
