"""The shipped trained adapter (`mini-sd-negative`, `training.lora_style`) on the trained `mini-sd`.

It does what it was trained for — the image's colours come out inverted (cyan on yellow for
"red on blue"), strongly anti-correlated with the same request without it, in the same step
batch — and equals diffusers' pipeline with the same file loaded, run alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepfleet.serving.params import GenerationParams, LoraRef, LoraSpec

SHIPPED = "serving/builtin/loras/mini-sd-negative.safetensors"
PROMPT = "a red sneaker on a blue background"
STEPS = 10


@pytest.fixture(scope="module")
def shipped() -> bytes:
    from pathlib import Path

    import stepfleet.serving

    path = Path(stepfleet.serving.__file__).parent / "builtin" / "loras" / "mini-sd-negative.safetensors"
    return path.read_bytes()


def test_the_trained_adapter_inverts_colours_and_equals_the_pipeline(shipped):
    from stepfleet.serving.adapters.extension import LoraExtension
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    model = load_model("mini-sd", device="cpu")
    backbone = load_backbone(model)
    registry = AdapterRegistry(model.family, backbone.denoiser, device_bytes=1 << 30, host_bytes=1 << 30,
                               disk_bytes=1 << 30)
    entry = registry.add("negative", shipped)
    assert entry.rank == 4 and entry.modules > 50
    runner = ModelRunner(backbone, extensions=[LoraExtension(backbone.denoiser, registry)])

    def params(lora: bool) -> GenerationParams:
        spec = LoraSpec((LoraRef("negative", 1.0),), wait="full") if lora else None
        return GenerationParams(prompt=PROMPT, width=64, height=64, num_inference_steps=STEPS, seed=3, lora=spec)

    states = [runner.prepare(params(True), 3).state, runner.prepare(params(False), 3).state]
    while states[0].steps_left:
        runner.step(states)
    neg, base = (runner.decode(s, output_type="np").images[0] for s in states)
    registry.close()

    x, y = neg.reshape(-1) - neg.mean(), base.reshape(-1) - base.mean()
    corr = float(x @ y / np.sqrt((x @ x) * (y @ y)))
    assert corr < -0.4, corr
    corner_base, corner_neg = base[:6, :6].reshape(-1, 3).mean(0), neg[:6, :6].reshape(-1, 3).mean(0)
    assert corner_base[2] > corner_base[0] + 0.2  # a blue background
    assert min(corner_neg[0], corner_neg[1]) > corner_neg[2] + 0.2  # turned yellow

    pipe = load_model("mini-sd", device="cpu").pipeline
    from safetensors.torch import load

    pipe.load_lora_weights(load(shipped), adapter_name="negative")
    expected = pipe(PROMPT, height=64, width=64, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0]
    assert float(np.abs(neg - expected).max() / np.abs(expected).max()) <= 1e-4
