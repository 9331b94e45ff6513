"""Built-in models made from configs: `tiny-sd`, `tiny-sdxl` for tests; `*-random` for GPUs.

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

`tiny-sdxl` is the SDXL family's tiny model, built the way diffusers' own SDXL tests build
theirs (`get_dummy_components`): a UNet with the `text_time` added conditioning (pooled text
embedding plus six micro-conditioning ids) and linear-projection transformer blocks, a CLIP
text encoder and a `CLIPTextModelWithProjection` whose hidden states are concatenated
(cross-attention 32 + 32), both with our byte-level tokenizer (the second padded with `!`,
as SDXL's is), the four-block VAE of `tiny-sd` (latent factor 8) with SDXL's scaling factor,
and SDXL base 1.0's own Euler scheduler config. UNet 2.0 M parameters, 9 MB on disk; one
guided step at 256x256 took 38 ms against tiny-sd's 30 ms (2-core CPU, interleaved runs).

`sdxl-random` is SDXL base 1.0's exact architecture (UNet 2.57 B parameters, CLIP ViT-L
and OpenCLIP ViT-bigG text encoders, the SDXL VAE) with random weights: about 14 GB in
float32, built only where it will be measured (never on a CPU in CI).

`mini-sd` is different: it is *trained* (`stepfleet train mini-sd`, see `stepfleet.training`),
on coloured Fashion-MNIST scenes at 64×64 ("a red ankle boot on a blue background"), and its
float16 weights ship inside the package (`serving/builtin/mini-sd`, 24 MB), so nothing is built:
`ensure_builtin` returns that directory. It is the default of `make demo` and `stepfleet up`;
the random `tiny-sd` stays the model of the exactness tests.

Each model has its own version (`BUILTIN_VERSIONS`), which names its cache directory: bump
a model's version when its configs change, and only that model is rebuilt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from stepfleet.serving.builtin_dit import DIT_BUILTINS, DIT_VERSION  # torch-free names
from stepfleet.serving.builtin_video import VIDEO_BUILTINS, VIDEO_VERSION  # torch-free names
from stepfleet.serving.controlnet import BUILTIN_CONTROLNETS  # torch-free names

TINY_SD = "tiny-sd"
SD15_RANDOM = "sd15-random"
TINY_SDXL = "tiny-sdxl"
MINI_SD = "mini-sd"
#: Trained built-ins, shipped as files in the package rather than built from configs.
TRAINED_BUILTINS: dict[str, Path] = {MINI_SD: Path(__file__).parent / "builtin" / MINI_SD}
SDXL_RANDOM = "sdxl-random"
TINY_SD_SEED = 0
#: Bumped whenever the SD configs below change, so stale caches are rebuilt.
TINY_SD_VERSION = "1"
#: The same for the SDXL configs (independent, so a change to one family rebuilds only it).
TINY_SDXL_VERSION = "1"
#: Each built-in's version, which names its cache directory (`{name}-v{version}`).
BUILTIN_VERSIONS: dict[str, str] = {
    TINY_SD: TINY_SD_VERSION,
    SD15_RANDOM: TINY_SD_VERSION,
    TINY_SDXL: TINY_SDXL_VERSION,
    SDXL_RANDOM: TINY_SDXL_VERSION,
    **{name: DIT_VERSION for name in DIT_BUILTINS},  # tiny-sd3, sd3-random, tiny-flux, flux-random
    **{name: VIDEO_VERSION for name in VIDEO_BUILTINS},  # tiny-wan, wan-random
}

#: SDXL base 1.0's `scheduler/scheduler_config.json`, verbatim: the keys Euler does not use
#: (`clip_sample`, `set_alpha_to_one`, ...) are kept in its config, so a DDIM made from it
#: (`schedulers.make_scheduler`) is configured as it would be from the real checkpoint.
SDXL_SCHEDULER_CONFIG: dict[str, object] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


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


def word_merges(word: str) -> list[tuple[str, str]]:
    """The BPE merges that make `word` one token: its prefixes grown a letter at a time."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, prefix = [], symbols[0]
    for sym in symbols[1:]:
        merges.append((prefix, sym))
        prefix += sym
    return merges


def write_tokenizer_files(directory: Path, words: Sequence[str] = ()) -> None:
    """Write a byte-level CLIP vocabulary (every byte, with and without `</w>`) and merges.

    `words` become whole tokens (a trained model's vocabulary, so "boot" is one id, not four),
    except where one of the handful of letter-pair merges, ranked first, wins inside a word
    ("coat" is `co` + `at`); any other text still tokenises, byte by byte.
    """
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    # A handful of merges of common English letter pairs keeps tokenisation non-trivial.
    merges = [("t", "h"), ("i", "n"), ("a", "n"), ("th", "e</w>"), ("o", "n</w>"), ("a", "t</w>")]
    for word in words:
        merges += [m for m in word_merges(word) if m not in merges]
    merges = list(dict.fromkeys(merges))
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


def build_tiny_sdxl(out_dir: str | os.PathLike[str]) -> Path:
    """Build the tiny SDXL pipeline with a fixed seed and `save_pretrained` it to `out_dir`."""
    return build_builtin(out_dir, TINY_SDXL)


def unet_config(name: str) -> dict:
    """The UNet config of an SD-1.x- or SDXL-family built-in (e.g. to count a real architecture's work
    on the meta device, or to build only its denoiser on a GPU, without building the rest)."""
    if name in (TINY_SDXL, SDXL_RANDOM):
        return dict(_sdxl_configs(name)["unet"])
    return dict(_configs(name)["unet"])


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


def _sdxl_configs(name: str) -> dict[str, dict]:
    """UNet, VAE and the two text encoders' configs of an SDXL-family built-in."""
    if name == TINY_SDXL:  # diffusers' SDXL get_dummy_components, widened to tiny-sd's UNet
        return {
            "unet": dict(
                block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + text_encoder_2's projection
                cross_attention_dim=32 + 32, norm_num_groups=32,
            ),
            "vae": dict(
                block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=256,
                scaling_factor=0.13025, force_upcast=True,
            ),
            "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                         projection_dim=32, hidden_act="quick_gelu"),
            "text_2": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                           projection_dim=32, hidden_act="gelu"),
        }
    if name == SDXL_RANDOM:  # the configs of stabilityai/stable-diffusion-xl-base-1.0
        return {
            "unet": dict(
                block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4,
                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816,
                cross_attention_dim=2048, norm_num_groups=32,
            ),
            "vae": dict(
                block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True,
            ),
            # The real vocabulary's size: our tokenizer uses its first few hundred ids only.
            "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768, hidden_act="quick_gelu", vocab_size=49408),
            "text_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                           projection_dim=1280, hidden_act="gelu", vocab_size=49408),
        }
    raise ValueError(f"unknown built-in model {name!r}")


def sdxl_modules(name: str, tokenizer: object, tokenizer_2: object) -> dict[str, object]:
    """An SDXL built-in's UNet, VAE and text encoders with their fixed seeds (on the `meta`
    device inside `with torch.device("meta")`: how tests count `sdxl-random`'s parameters)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = _sdxl_configs(name)

    def text_config(tok: object, overrides: dict) -> CLIPTextConfig:
        base = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,  # type: ignore[attr-defined]
                    pad_token_id=tok.pad_token_id, layer_norm_eps=1e-05,  # type: ignore[attr-defined]
                    vocab_size=len(tok), max_position_embeddings=77)  # type: ignore[arg-type]
        return CLIPTextConfig(**{**base, **overrides})

    torch.manual_seed(TINY_SD_SEED)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(TINY_SD_SEED + 1)
    vae = AutoencoderKL(**cfg["vae"])
    torch.manual_seed(TINY_SD_SEED + 2)
    text_encoder = CLIPTextModel(text_config(tokenizer, cfg["text"]))
    torch.manual_seed(TINY_SD_SEED + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, cfg["text_2"]))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }


def sdxl_tokenizers(tok_dir: Path) -> tuple[object, object]:
    """CLIP-L's tokenizer and OpenCLIP-bigG's (the same BPE, padded with `!` instead of EOS)."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    tokenizer.model_max_length = 77
    tokenizer_2 = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!")
    tokenizer_2.model_max_length = 77
    return tokenizer, tokenizer_2


def _build_sdxl(out: Path, name: str) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = sdxl_tokenizers(out / "_tokenizer_src")
    pipe = StableDiffusionXLPipeline(
        **sdxl_modules(name, tokenizer, tokenizer_2),  # type: ignore[arg-type]
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,  # SDXL base's setting: no negative prompt → zero rows
        add_watermarker=False,
    )
    pipe.save_pretrained(str(out))


def build_builtin(out_dir: str | os.PathLike[str], name: str) -> Path:
    if name in TRAINED_BUILTINS:  # shipped, not built: a copy of the package's files
        import shutil

        shutil.copytree(TRAINED_BUILTINS[name], out_dir, dirs_exist_ok=True)
        return Path(out_dir)
    if name in VIDEO_BUILTINS:  # Wan: `builtin_video`
        from stepfleet.serving.builtin_video import build as build_video

        out = Path(out_dir)
        build_video(out, name)
        (out / "stepfleet_model.json").write_text(
            json.dumps({"name": name, "version": BUILTIN_VERSIONS[name], "seed": TINY_SD_SEED})
        )
        return out
    if name in DIT_BUILTINS:  # SD3 and Flux: `builtin_dit`
        from stepfleet.serving.builtin_dit import build as build_dit

        out = Path(out_dir)
        build_dit(out, name)
        (out / "stepfleet_model.json").write_text(
            json.dumps({"name": name, "version": BUILTIN_VERSIONS[name], "seed": TINY_SD_SEED})
        )
        return out
    if name in (TINY_SDXL, SDXL_RANDOM):
        out = Path(out_dir)
        _build_sdxl(out, name)
        (out / "stepfleet_model.json").write_text(
            json.dumps({"name": name, "version": BUILTIN_VERSIONS[name], "seed": TINY_SD_SEED})
        )
        return out
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
    if name in TRAINED_BUILTINS:
        path = TRAINED_BUILTINS[name]
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"built-in {name!r} is missing its files in {path} (a broken install?)")
        return path
    if name in BUILTIN_CONTROLNETS:  # add-ons, not pipelines: built by their own room
        from stepfleet.serving.controlnet.builtins import ensure_controlnet

        return ensure_controlnet(name, cache_dir)
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    if name not in BUILTIN_VERSIONS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    target = base / f"{name}-v{BUILTIN_VERSIONS[name]}"
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


BUILTIN_MODELS: tuple[str, ...] = (MINI_SD, TINY_SD, SD15_RANDOM, TINY_SDXL, SDXL_RANDOM, *DIT_BUILTINS,
                                 *VIDEO_BUILTINS)
