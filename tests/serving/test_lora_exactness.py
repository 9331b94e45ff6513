"""Per-row LoRA inside one batched step equals diffusers' pipeline with the same LoRA, run alone.

Adapters get seeded non-zero A and B (`lora_files`), one in diffusers' PEFT layout and one in
kohya's, so both conversions are checked. In one mixed batch: a request with adapter `a`,
one with none, one composing `a` and `b`, one unguided with `b` — each equals
`load_lora_weights` + `set_adapters` (same scales) run alone, ≤ 1e-4 relative, for SD 1.x and
SDXL; and the adapter visibly changes the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepfleet.serving.params import GenerationParams, LoraRef, LoraSpec
from tests.serving.lora_files import lora_bytes, lora_tensors

SIZE = 64
STEPS = 3
TOL = 1e-4

CASES = {  # request name → (adapters with scales, guidance)
    "a": ((("a", 0.8),), 7.5),
    "none": ((), 7.5),
    "a+b": ((("a", 0.7), ("b", 0.5)), 7.5),
    "b-unguided": ((("b", 1.0),), 1.0),
}


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def params(name: str, seed: int) -> GenerationParams:
    adapters, guidance = CASES[name]
    # `full`: every step with its adapters (`bounded` may start before a load lands; test_lora_loading).
    spec = LoraSpec(tuple(LoraRef(n, s) for n, s in adapters), wait="full") if adapters else None
    return GenerationParams(prompt=f"a {name} lighthouse", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                            guidance_scale=guidance, negative_prompt="blurry", seed=seed, lora=spec)


def serving_stack(model_name: str):
    """A fresh model copy with the adapters registered, and a runner with the LoRA extension."""
    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model(model_name, device="cpu")
    backbone = load_backbone(model)
    registry = AdapterRegistry(model.family, backbone.denoiser, device_bytes=1 << 30, host_bytes=1 << 30,
                               disk_bytes=1 << 30)
    unet = backbone.denoiser
    registry.add("a", lora_bytes(unet, rank=4, seed=1, layout="peft"))
    registry.add("b", lora_bytes(unet, rank=8, seed=2, layout="kohya", alpha=4.0))
    ext = LoraExtension(unet, registry)
    return ModelRunner(backbone, extensions=[ext]), registry, model


def reference_pipe(model_name: str):
    from stepfleet.serving.loading import load_model

    pipe = load_model(model_name, device="cpu").pipeline
    unet = pipe.unet  # both files made before PEFT wraps the modules
    a, b = lora_tensors(unet, rank=4, seed=1, layout="peft"), lora_tensors(unet, rank=8, seed=2, layout="kohya",
                                                                          alpha=4.0)
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    return pipe


def run_pipeline(pipe, name: str, seed: int) -> np.ndarray:
    adapters, guidance = CASES[name]
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
    else:
        pipe.disable_lora()
    p = params(name, seed)
    return pipe(p.prompt, negative_prompt=p.negative_prompt, height=SIZE, width=SIZE,
                num_inference_steps=STEPS, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("model_name", ["tiny-sd", "tiny-sdxl"])
def test_mixed_adapter_batch_equals_pipeline_alone(model_name):
    runner, registry, _ = serving_stack(model_name)
    try:
        seeds = {name: 10 + i for i, name in enumerate(CASES)}
        states = {name: runner.prepare(params(name, seeds[name]), seeds[name]).state for name in CASES}
        batch = list(states.values())
        while batch[0].steps_left:
            runner.step(batch)
        ours = {name: runner.decode(s, output_type="np").images for name, s in states.items()}
    finally:
        registry.close()
    pipe = reference_pipe(model_name)
    expected = {name: run_pipeline(pipe, name, seeds[name]) for name in CASES}
    for name in CASES:
        assert rel(ours[name], expected[name]) <= TOL, name
    # The adapters do something: the same request without them draws a visibly different image.
    plain = run_pipeline(pipe, "none", seeds["a"])
    assert np.abs(expected["a"] - plain).mean() > 0.01
    assert np.abs(ours["a"] - plain).mean() > 0.01


DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.0.proj", "ff.net.2", "proj_out")
DIT_CASES = {"a": (("a", 0.8),), "none": (), "a+b": (("a", 0.6), ("b", 0.9))}


@pytest.mark.parametrize("model_name", ["tiny-sd3", "tiny-flux"])
def test_dit_families_mixed_adapter_batch_equals_pipeline_alone(model_name):
    """The DiT backbones: the same hooks on the transformer's projections (PEFT layout, `transformer.` keys)."""
    from safetensors.torch import save

    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model(model_name, device="cpu")
    backbone = load_backbone(model)
    files = {name: lora_tensors(backbone.denoiser, rank=rank, seed=seed, targets=DIT_TARGETS, prefix="transformer",
                                std=0.1) for name, rank, seed in (("a", 4, 1), ("b", 8, 2))}
    registry = AdapterRegistry(model.family, backbone.denoiser, device_bytes=1 << 30, host_bytes=1 << 30,
                               disk_bytes=1 << 30)
    for name, tensors in files.items():
        registry.add(name, save(tensors))
    runner = ModelRunner(backbone, extensions=[LoraExtension(backbone.denoiser, registry)])

    def dit_params(case: str, seed: int) -> GenerationParams:
        refs = tuple(LoraRef(n, s) for n, s in DIT_CASES[case])
        return GenerationParams(prompt=f"a {case} cat", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                                guidance_scale=5.0, seed=seed,
                                lora=LoraSpec(refs, wait="full") if refs else None)

    seeds = {case: 20 + i for i, case in enumerate(DIT_CASES)}
    states = {case: runner.prepare(dit_params(case, seeds[case]), seeds[case]).state for case in DIT_CASES}
    while next(iter(states.values())).steps_left:
        runner.step(list(states.values()))
    ours = {case: runner.decode(s, output_type="np").images for case, s in states.items()}
    registry.close()

    pipe = load_model(model_name, device="cpu").pipeline
    for name, tensors in files.items():
        pipe.load_lora_weights(tensors, adapter_name=name)
    for case, adapters in DIT_CASES.items():
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        else:
            pipe.disable_lora()
        expected = pipe(f"a {case} cat", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(seeds[case]), output_type="np").images
        assert rel(ours[case], expected) <= TOL, (case, rel(ours[case], expected))
    assert np.abs(ours["a"] - ours["none"]).mean() > 0.01


def test_equal_segments_take_the_batched_path_and_still_equal_the_pipeline():
    """Requests of one image each, each with its own adapter of one rank: every group's delta in one
    batched matmul per linear layer (`hooks._block`), the convs group by group."""
    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model("tiny-sd", device="cpu")
    backbone = load_backbone(model)
    unet = backbone.denoiser
    files = {"c": lora_tensors(unet, rank=4, seed=3), "d": lora_tensors(unet, rank=4, seed=4, layout="kohya",
                                                                         alpha=2.0)}
    registry = AdapterRegistry(model.family, unet, device_bytes=1 << 30, host_bytes=1 << 30, disk_bytes=1 << 30)
    for name in files:
        registry.add(name, lora_bytes(unet, rank=4, seed=3) if name == "c" else
                     lora_bytes(unet, rank=4, seed=4, layout="kohya", alpha=2.0))
    ext = LoraExtension(unet, registry)
    runner = ModelRunner(backbone, extensions=[ext])
    cases = {"c": 0.8, "d": 0.5}

    def p(name: str) -> GenerationParams:
        return GenerationParams(prompt=f"a {name} tower", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                                seed=30, negative_prompt="blurry", lora=LoraSpec((LoraRef(name, cases[name]),),
                                                                                 wait="full"))

    states = {name: runner.prepare(p(name), 30).state for name in cases}
    while states["c"].steps_left:
        runner.step(list(states.values()))
    assert ext.hooks._stacks, "the batched path ran"  # noqa: SLF001
    ours = {name: runner.decode(s, output_type="np").images for name, s in states.items()}
    registry.close()
    pipe = load_model("tiny-sd", device="cpu").pipeline
    for name, tensors in files.items():
        pipe.load_lora_weights(tensors, adapter_name=name)
    for name, scale in cases.items():
        pipe.set_adapters([name], [scale])
        expected = pipe(f"a {name} tower", negative_prompt="blurry", height=SIZE, width=SIZE,
                        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(30), output_type="np").images
        assert rel(ours[name], expected) <= TOL, (name, rel(ours[name], expected))
