"""Built-in Wan 2.1 text-to-video models made from configs: `tiny-wan` for tests, `wan-random` for GPUs.

As `builtin_dit` does for SD3/Flux (and diffusers' own Wan tests' `get_dummy_components`):
random weights from a fixed seed, written with `save_pretrained`, always loaded back through
`from_pretrained` — so tests take the path real checkpoints take.

Why Wan 2.1. Its denoiser (`WanTransformer3DModel`) takes one timestep per sample, its text
encoder (UMT5) is called once per request, and its pipeline guides with a plain negative row:
the runner's loop (per-request scheduler, per-row timesteps, rows concatenated across requests)
fits it without a special case. CogVideoX adds per-step rotary embeddings tied to the batch's
frame count and LTX packs latents into tokens with per-request frame rates in the call; both
would need more seam. Wan with `num_frames=1` draws an image, which is how one Wan worker
serves the Images and the Videos API at once (`backbones.wan`).

`tiny-wan`: the test-sized transformer of diffusers' Wan tests (2 layers, 2 heads of 12, patch
(1, 2, 2)), a UMT5 encoder of width 32, and the Wan VAE at `base_dim` 12 (the real one's
structure: 8× spatial, 4× temporal compression, 16 latent channels), with Wan 2.1's own UniPC
scheduler config (flow prediction, `flow_shift` 3). The UMT5 tokenizer is the `tokenizers`-built
Unigram of `builtin_dit` saved as `tokenizer.json` (no sentencepiece, no hub). Its default size
is 64×64 (`backbones.wan`); a request's limits are `videos.spec.VideoLimits`.

`wan-random`: Wan2.1-T2V-1.3B's transformer and VAE, and UMT5-XXL's architecture, in bfloat16,
built only when asked for (never in tests).
"""

from __future__ import annotations

from pathlib import Path

TINY_WAN = "tiny-wan"
WAN_RANDOM = "wan-random"
VIDEO_BUILTINS: tuple[str, ...] = (TINY_WAN, WAN_RANDOM)
#: Bumped whenever the configs below change (names the cache directories).
VIDEO_VERSION = "1"
SEED = 0

#: Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler config (UniPC on flow sigmas, shift 3).
WAN_SCHEDULER_CONFIG: dict[str, object] = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}


def configs(name: str) -> dict[str, dict]:
    """Each component's config (`transformer`, `vae`, `text`) of a video built-in."""
    if name == TINY_WAN:
        return {
            "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
            "vae": dict(base_dim=12, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                        temperal_downsample=[False, True, True]),
            "text": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                         feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True),
        }
    if name == WAN_RANDOM:  # Wan2.1-T2V-1.3B
        return {
            "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                rope_max_seq_len=1024),
            "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[False, True, True]),
            "text": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                         vocab_size=256384),
        }
    raise ValueError(f"unknown built-in video model {name!r}")


def modules(name: str, tokenizer: object) -> dict[str, object]:
    """A video built-in's modules with their fixed seeds."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = configs(name)
    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(**cfg["transformer"])
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKLWan(**cfg["vae"])
    torch.manual_seed(SEED + 2)
    text = {"vocab_size": len(tokenizer), **cfg["text"]}  # type: ignore[arg-type]
    encoder = UMT5EncoderModel(UMT5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **text))
    return {"transformer": transformer, "vae": vae, "text_encoder": encoder}


def build(out: Path, name: str) -> None:
    """Build `name` with its fixed seeds and `save_pretrained` it to `out` (bfloat16 unless tiny)."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from stepfleet.serving.builtin_dit import t5_tokenizer

    tokenizer = t5_tokenizer()
    previous = torch.get_default_dtype()
    if name != TINY_WAN:
        torch.set_default_dtype(torch.bfloat16)
    try:
        pipe = WanPipeline(**modules(name, tokenizer), tokenizer=tokenizer,  # type: ignore[arg-type]
                           scheduler=UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG))
    finally:
        torch.set_default_dtype(previous)
    pipe.save_pretrained(str(out))
