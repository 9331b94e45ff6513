"""SD 2.x through the SD backbone: `v_prediction`, linear projections, family `sd2`.

A tiny SD-2-shaped pipeline (UNet with `use_linear_projection` and per-block head dims, a
scheduler predicting `v`) is built from config, saved, and loaded back with
`from_pretrained` as family `sd2`; one request through the runner must equal diffusers'
own `StableDiffusionPipeline` run alone, and the prediction type must matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepfleet.serving.backbones import load_backbone
from stepfleet.serving.loading import load_model
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.runner import ModelRunner

SIZE = 128


def build_tiny_sd2(out, prediction_type: str) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from stepfleet.serving.builtin_models import write_tokenizer_files

    write_tokenizer_files(out / "_tok")
    tokenizer = CLIPTokenizer(str(out / "_tok" / "vocab.json"), str(out / "_tok" / "merges.txt"))
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), max_position_embeddings=77, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(out))


@pytest.fixture(scope="module")
def sd2_runner(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-sd2")
    build_tiny_sd2(out, "v_prediction")
    model = load_model(str(out), device="cpu", family="sd2")
    backbone = load_backbone(model)
    assert backbone.family == "sd2" and backbone.capabilities.prediction_type == "v_prediction"
    return model, ModelRunner(backbone)


def run(runner, params, seed):
    r = runner.prepare(params, seed).state
    while r.steps_left:
        runner.step([r])
    return runner.decode(r, output_type="np").images


@pytest.mark.parametrize("scheduler", [None, "euler", "dpmpp_2m"])
def test_v_prediction_request_equals_diffusers_pipeline(sd2_runner, scheduler):
    from stepfleet.serving.schedulers import make_scheduler

    model, runner = sd2_runner
    pipe = model.pipeline
    params = GenerationParams(prompt="a v-predicted fox", width=SIZE, height=SIZE, n=2, num_inference_steps=5,
                              guidance_scale=6.0, negative_prompt="blurry", scheduler=scheduler)
    original = pipe.scheduler
    try:
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, original.config, type(original))
        expected = pipe(params.prompt, negative_prompt="blurry", height=SIZE, width=SIZE, num_images_per_prompt=2,
                        num_inference_steps=5, guidance_scale=6.0, generator=torch.Generator().manual_seed(4),
                        output_type="np").images
    finally:
        pipe.scheduler = original
    ours = run(runner, params, 4)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_prediction_type_changes_the_image(sd2_runner, tmp_path):
    """Guards the equality above from being trivial: epsilon and v readings of one UNet differ."""
    model, runner = sd2_runner
    params = GenerationParams(prompt="a fox", width=SIZE, height=SIZE, num_inference_steps=4, guidance_scale=1.0)
    eps = type(model.pipeline.scheduler).from_config(model.pipeline.scheduler.config, prediction_type="epsilon")
    v_image = run(runner, params, 1)
    model.pipeline.scheduler = eps
    try:
        eps_image = run(ModelRunner(load_backbone(model)), params, 1)
    finally:
        model.pipeline.scheduler = runner.backbone.scheduler
    assert np.abs(v_image - eps_image).max() > 1e-2


def test_sd2_checkpoint_asked_as_sdxl_is_refused_naming_both(sd2_runner, tmp_path):
    from stepfleet.serving.backbones import FamilyMismatch

    model, _ = sd2_runner
    with pytest.raises(FamilyMismatch, match=r"sdxl.*StableDiffusionPipeline"):
        load_model(model.source, device="cpu", family="sdxl")
