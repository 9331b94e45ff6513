"""Built-in models made from configs: `tiny-sd` for laptops and tests, `sd15-random` for GPUs.

Why it exists: tests, the demo and CI must run the *real* serving path — a diffusers
pipeline loaded with `from_pretrained` from a directory on disk — without downloading
weights. So the tiny model is built from configs with a fixed seed, written once with
`save_pretrained`, and from then on always loaded back from disk exactly like real weights.

Shape choices (see TOOLING.md): the VAE has four blocks so the latent scale factor is 8,
as in SD 1.x/2.x; the UNet has two levels with cross-attention so the per-step cost has
the same structure (convolutions plus transformer blocks) as the real model; the tokenizer
is a byte-level CLIP BPE with a vocabulary written locally.

`sd15-random` has Stable Diffusion 1.5's exact architecture (UNet 860 M parameters, CLIP
ViT-L/14 text encoder, the SD VAE) with random weights: the real model's compute, for
measuring the engine on an accelerator where no weights can be downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TINY_SD = "tiny-sd"
SD15_RANDOM = "sd15-random"
TINY_SD_SEED = 0
#: Bumped whenever the configs below change, so stale caches are rebuilt.
TINY_SD_VERSION = "1"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte→unicode table, so every byte has a printable token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tokenizer_files(directory: Path) -> None:
    """Write a byte-level CLIP vocabulary (every byte, with and without `</w>`) and a few merges."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    # A handful of merges of common English letter pairs keeps tokenisation non-trivial.
    merges = [("t", "h"), ("i", "n"), ("a", "n"), ("th", "e</w>"), ("o", "n</w>"), ("a", "t</w>")]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )


def build_tiny_sd(out_dir: str | os.PathLike[str]) -> Path:
    """Build the tiny pipeline with a fixed seed and `save_pretrained` it to `out_dir`."""
    return build_builtin(out_dir, TINY_SD)


def build_sd15_random(out_dir: str | os.PathLike[str]) -> Path:
    """Build an SD-1.5-shaped pipeline with random weights (about 4 GB in float32)."""
    return build_builtin(out_dir, SD15_RANDOM)


def _configs(name: str) -> dict[str, dict]:
    if name == TINY_SD:
        return {
            "unet": dict(
                block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
            ),
            "vae": dict(
                block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=256,
            ),
            "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5),
        }
    if name == SD15_RANDOM:  # the configs of runwayml/stable-diffusion-v1-5
        return {
            "unet": dict(
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            ),
            "vae": dict(
                block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, layers_per_block=2, sample_size=512,
            ),
            "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768, hidden_act="quick_gelu"),
        }
    raise ValueError(f"unknown built-in model {name!r}")


def build_builtin(out_dir: str | os.PathLike[str], name: str) -> Path:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    tok_dir = out / "_tokenizer_src"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    tokenizer.model_max_length = 77

    cfg = _configs(name)
    torch.manual_seed(TINY_SD_SEED)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(TINY_SD_SEED + 1)
    vae = AutoencoderKL(**cfg["vae"])
    torch.manual_seed(TINY_SD_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            layer_norm_eps=1e-05,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            **cfg["text"],
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    (out / "stepfleet_model.json").write_text(
        json.dumps({"name": name, "version": TINY_SD_VERSION, "seed": TINY_SD_SEED})
    )
    return out


def default_cache_dir() -> Path:
    """Where built-in models are materialised: $STEPFLEET_CACHE, else ~/.cache/stepfleet."""
    root = os.environ.get("STEPFLEET_CACHE") or os.path.join(Path.home(), ".cache", "stepfleet")
    return Path(root) / "models"


def ensure_builtin(name: str = TINY_SD, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of a built-in model, building it on first use (atomic, safe for parallel workers)."""
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    target = base / f"{name}-v{TINY_SD_VERSION}"
    if (target / "model_index.json").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{name}-{os.getpid()}-{id(base)}"
    build_builtin(staging, name)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical (same seed)
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


BUILTIN_MODELS: tuple[str, ...] = (TINY_SD, SD15_RANDOM)
