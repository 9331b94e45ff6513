"""`mini-sd`: Stable Diffusion's architecture at the size of a 64×64 Fashion-MNIST scene.

The same classes `StableDiffusionPipeline` loads (`AutoencoderKL`, `UNet2DConditionModel`,
`CLIPTextModel` + `CLIPTokenizer`), so the trained model is served, cached and edited by
exactly the code that serves SD 1.5. Sizes (see TOOLING.md's measured training costs):
- VAE with three blocks: latent scale factor 4, so a 64×64 image is a 16×16×4 latent — room
  for a mask of a tenth of the picture to mean something;
- UNet (64, 128, 128) with cross-attention at every level, 6.6 M parameters;
- a four-layer CLIP text encoder of width 128 over a tokenizer that knows the captions' words.
The whole checkpoint is about 20 MB in float16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepfleet.serving.builtin_models import write_tokenizer_files
from stepfleet.training.scenes import SIZE, vocabulary

NAME = "mini-sd"
LATENT_SIZE = SIZE // 4

VAE_CONFIG: dict = dict(
    block_out_channels=(32, 64, 64), in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=SIZE,
)
UNET_CONFIG: dict = dict(
    block_out_channels=(64, 128, 128), layers_per_block=2, sample_size=LATENT_SIZE,
    in_channels=4, out_channels=4, cross_attention_dim=128, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32,
)
TEXT_CONFIG: dict = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4)
#: Stable Diffusion 1.x's noise schedule (what `StableDiffusionPipeline`'s schedulers expect).
NOISE_SCHEDULE: dict = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def make_tokenizer(directory: Path) -> CLIPTokenizer:
    write_tokenizer_files(directory, vocabulary())
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.model_max_length = 77
    return tokenizer


def make_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def make_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def make_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
            max_position_embeddings=77, **TEXT_CONFIG,
        )
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def inference_scheduler() -> DDIMScheduler:
    """The pipeline's default sampler: DDIM over SD 1.x's schedule (any SD scheduler works)."""
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def export_pipeline(
    out: Path,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the trained model in `save_pretrained` layout (float16 on disk by default)."""
    import copy

    def cast(module: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(module).to(device="cpu", dtype=dtype)

    pipe = StableDiffusionPipeline(
        vae=cast(vae), unet=cast(unet), text_encoder=cast(text_encoder), tokenizer=tokenizer,
        scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    # transformers 5 saves only tokenizer.json; 4.x's CLIPTokenizer reads vocab.json + merges.txt.
    write_tokenizer_files(out / "tokenizer", vocabulary())
    return out
