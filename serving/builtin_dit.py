"""Built-in DiT models made from configs: `tiny-sd3`, `tiny-flux` for tests; `*-random` for GPUs.

As `builtin_models` does for the UNet families (and diffusers' own SD3/Flux tests'
`get_dummy_components`): random weights from a fixed seed, written with `save_pretrained`,
always loaded back through `from_pretrained`.

Shapes. Both tiny models have the real families' structure at toy widths: a four-block VAE
(latent factor 8) with 16 latent channels, a `shift_factor` and no quant convs, as SD3's and
Flux's VAEs; SD3's transformer patchifies by 2 (as SD3's), Flux's packs 2×2 (so both have
(h/2)·(w/2) image tokens); CLIP encoders on the byte-level tokenizer of `builtin_models`
(SD3's second padded with `!` as CLIP-G's is), and a T5 encoder. `tiny-sd3` uses SD3.5's
RMS-normed attention (`qk_norm`) and SD3's fixed-shift scheduler config; `tiny-flux` is
guidance-distilled (`guidance_embeds`, as FLUX.1-dev) with FLUX.1-dev's scheduler config
(resolution-dependent shift). The VAE's `sample_size` (256) is each tiny model's default size.

The T5 tokenizer is built with the `tokenizers` library (a Unigram model over letters, digits,
punctuation and a few words, Metaspace pre-tokenisation, `</s>` appended) and saved as
`tokenizer.json`, so neither sentencepiece nor a hub download is needed.

`sd3-random` is SD3-medium's architecture (MMDiT 2.0 B parameters, CLIP-L, CLIP-G, the SD3
VAE) with random weights and no T5 (`text_encoder_3=None`, which diffusers allows: the T5
tokens are zeros; T5-XXL would add 4.7 B parameters that do not touch the denoiser's cost).
`flux-random` is FLUX.1-dev's (transformer 11.9 B, CLIP-L, T5-XXL 4.7 B, the Flux VAE). Both are
built in bfloat16 (Flux's 17 B parameters would be 67 GB in float32) and only where they will
be measured, never in tests (which count their parameters on the `meta` device).
"""

from __future__ import annotations

import string
from pathlib import Path

TINY_SD3 = "tiny-sd3"
TINY_FLUX = "tiny-flux"
SD3_RANDOM = "sd3-random"
FLUX_RANDOM = "flux-random"
DIT_BUILTINS: tuple[str, ...] = (TINY_SD3, SD3_RANDOM, TINY_FLUX, FLUX_RANDOM)
#: Bumped whenever the configs below change (names the cache directories).
DIT_VERSION = "1"
SEED = 0

#: stabilityai/stable-diffusion-3-medium-diffusers' scheduler config.
SD3_SCHEDULER_CONFIG: dict[str, object] = {"num_train_timesteps": 1000, "shift": 3.0}
#: black-forest-labs/FLUX.1-dev's scheduler config.
FLUX_SCHEDULER_CONFIG: dict[str, object] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}


def t5_tokenizer(words: tuple[str, ...] = ("the", "a", "of", "and", "cat", "dog", "red", "blue")) -> object:
    """A T5-style fast tokenizer built locally: Unigram pieces, `</s>` appended, `<pad>` = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -3.5) for c in string.ascii_lowercase]
    pieces += [("▁" + w, -1.0) for w in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def _vae(name: str, shift: float, scale: float) -> dict:
    tiny = name.startswith("tiny")
    return dict(block_out_channels=(16, 16, 32, 32) if tiny else (128, 256, 512, 512), in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=16, layers_per_block=1 if tiny else 2, norm_num_groups=8 if tiny else 32,
                sample_size=256 if tiny else 1024, shift_factor=shift, scaling_factor=scale,
                use_quant_conv=False, use_post_quant_conv=False)


def _clip(tiny: bool, hidden: int, layers: int, act: str) -> dict:
    if tiny:
        return dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                    projection_dim=32, hidden_act=act)
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                num_hidden_layers=layers, projection_dim=hidden, hidden_act=act, vocab_size=49408)


def _t5(tiny: bool, d_model: int) -> dict:
    if tiny:
        return dict(d_model=d_model, d_kv=16, d_ff=96, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
    return dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                is_gated_act=True, vocab_size=32128)


def configs(name: str) -> dict[str, dict]:
    """Each component's config of a DiT built-in (`transformer`, `vae`, text encoders)."""
    tiny = name.startswith("tiny")
    if name in (TINY_SD3, SD3_RANDOM):
        transformer = (
            dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                 pos_embed_max_size=64, qk_norm="rms_norm")
            if tiny else  # SD3 medium
            dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                 pooled_projection_dim=2048, pos_embed_max_size=192)
        )
        out = {"transformer": transformer, "vae": _vae(name, 0.0609, 1.5305),
               "text": _clip(tiny, 768, 12, "quick_gelu"), "text_2": _clip(tiny, 1280, 32, "gelu")}
        if tiny:
            out["text_3"] = _t5(tiny, 64)  # CLIP-L + CLIP-G (32 + 32) are padded to T5's width
        return out
    if name in (TINY_FLUX, FLUX_RANDOM):
        transformer = (
            dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
            if tiny else  # FLUX.1-dev
            dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
        )
        return {"transformer": transformer, "vae": _vae(name, 0.1159, 0.3611),
                "text": _clip(tiny, 768, 12, "quick_gelu"), "text_2": _t5(tiny, 32)}
    raise ValueError(f"unknown built-in DiT model {name!r}")


def tokenizers(tok_dir: Path) -> tuple[object, object, object]:
    """CLIP-L's and CLIP-G's tokenizers (the byte-level BPE; the second padded with `!`) and T5's."""
    from stepfleet.serving.builtin_models import sdxl_tokenizers

    clip, clip_g = sdxl_tokenizers(tok_dir)
    return clip, clip_g, t5_tokenizer()


def modules(name: str, tokenizer: object, t5_tok: object) -> dict[str, object]:
    """A DiT built-in's modules with their fixed seeds (inside `with torch.device("meta")`: no memory)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = configs(name)

    def clip_config(overrides: dict) -> CLIPTextConfig:
        base = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
                    pad_token_id=tokenizer.pad_token_id, layer_norm_eps=1e-05,  # type: ignore[attr-defined]
                    vocab_size=len(tokenizer), max_position_embeddings=77)  # type: ignore[arg-type]
        return CLIPTextConfig(**{**base, **overrides})

    def t5(overrides: dict) -> T5EncoderModel:
        base = dict(vocab_size=len(t5_tok), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # type: ignore[arg-type]
        return T5EncoderModel(T5Config(**{**base, **overrides}))

    sd3 = name in (TINY_SD3, SD3_RANDOM)
    torch.manual_seed(SEED)
    out: dict[str, object] = {
        "transformer": (SD3Transformer2DModel if sd3 else FluxTransformer2DModel)(**cfg["transformer"])}
    torch.manual_seed(SEED + 1)
    out["vae"] = AutoencoderKL(**cfg["vae"])
    torch.manual_seed(SEED + 2)
    out["text_encoder"] = (CLIPTextModelWithProjection if sd3 else CLIPTextModel)(clip_config(cfg["text"]))
    torch.manual_seed(SEED + 3)
    out["text_encoder_2"] = CLIPTextModelWithProjection(clip_config(cfg["text_2"])) if sd3 else t5(cfg["text_2"])
    if sd3:
        torch.manual_seed(SEED + 4)
        out["text_encoder_3"] = t5(cfg["text_3"]) if "text_3" in cfg else None
    return out


def build(out: Path, name: str) -> None:
    """Build `name` with its fixed seeds and `save_pretrained` it to `out` (bfloat16 unless tiny)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    clip, clip_g, t5_tok = tokenizers(out / "_tokenizer_src")
    previous = torch.get_default_dtype()
    if not name.startswith("tiny"):
        torch.set_default_dtype(torch.bfloat16)
    try:
        if name in (TINY_SD3, SD3_RANDOM):
            mods = modules(name, clip, t5_tok)
            pipe = StableDiffusion3Pipeline(
                **mods, tokenizer=clip, tokenizer_2=clip_g,  # type: ignore[arg-type]
                tokenizer_3=t5_tok if mods["text_encoder_3"] is not None else None,
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
            )
        else:
            pipe = FluxPipeline(
                **modules(name, clip, t5_tok), tokenizer=clip, tokenizer_2=t5_tok,  # type: ignore[arg-type]
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
            )
    finally:
        torch.set_default_dtype(previous)
    pipe.save_pretrained(str(out))
