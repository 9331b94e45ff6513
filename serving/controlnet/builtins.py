"""Built-in ControlNets: `tiny-controlnet` (for `tiny-sd`) and `tiny-controlnet-sdxl` (for `tiny-sdxl`).

Why seeded output weights: diffusers zero-initialises a new ControlNet's output convolutions
(`controlnet_down_blocks`, `controlnet_mid_block`, the conditioning embedding's `conv_out`),
so an untrained net adds exactly nothing and every "equals the pipeline" test would pass even
if the residuals never reached the UNet. These nets re-draw those convolutions with PyTorch's
default (Kaiming-uniform) initialisation from a fixed seed, so control visibly changes the
image (tested), and like every built-in they are written with `save_pretrained` and loaded back
through `from_pretrained`, the path real weights take.

Shapes follow diffusers' own ControlNet tests (`get_dummy_components`), matched to our tiny
UNets; the conditioning embedding has four levels (three stride-2 convolutions) so the control
image is downsampled by 8, the VAE factor of our tiny models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from stepfleet.serving.controlnet import BUILTIN_BASES, TINY_CONTROLNET, TINY_CONTROLNET_SDXL

SEED = 7
#: Bump when a config below changes: it names the cache directory.
VERSIONS: dict[str, str] = {TINY_CONTROLNET: "1", TINY_CONTROLNET_SDXL: "1"}
#: The base built-in each net fits.
BASE_MODEL: dict[str, str] = BUILTIN_BASES

_COMMON = dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), norm_num_groups=32,
               conditioning_embedding_out_channels=(16, 16, 32, 32))
CONFIGS: dict[str, dict[str, object]] = {
    TINY_CONTROLNET: dict(_COMMON, cross_attention_dim=32, attention_head_dim=8),
    TINY_CONTROLNET_SDXL: dict(_COMMON, attention_head_dim=(2, 4), use_linear_projection=True,
                               addition_embed_type="text_time", addition_time_embed_dim=8,
                               transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                               cross_attention_dim=32 + 32),
}


def build_controlnet(out_dir: str | os.PathLike[str], name: str, seed: int = SEED) -> Path:
    """Build built-in ControlNet `name` with non-zero output convolutions and `save_pretrained` it."""
    import torch
    from diffusers import ControlNetModel

    if name not in CONFIGS:
        raise ValueError(f"unknown built-in ControlNet {name!r}; choose one of {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    net = ControlNetModel(**CONFIGS[name])  # type: ignore[arg-type]
    torch.manual_seed(seed + 1)
    outputs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    for conv in outputs:
        conv.reset_parameters()  # Kaiming-uniform weights and bias, instead of diffusers' zeros
    out = Path(out_dir)
    net.save_pretrained(str(out))
    (out / "stepfleet_model.json").write_text(json.dumps({"name": name, "version": VERSIONS[name], "seed": seed,
                                                         "base": BASE_MODEL[name]}))
    return out


def ensure_controlnet(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of built-in ControlNet `name`, built on first use (atomically, like the models)."""
    from stepfleet.serving.builtin_models import default_cache_dir

    if name not in VERSIONS:
        raise ValueError(f"unknown built-in ControlNet {name!r}; choose one of {', '.join(VERSIONS)}")
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    target = base / f"{name}-v{VERSIONS[name]}"
    if (target / "config.json").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{name}-{os.getpid()}-{id(base)}"
    build_controlnet(staging, name)
    try:
        staging.rename(target)
    except OSError:  # another process built it first; same seed, same files
        shutil.rmtree(staging, ignore_errors=True)
    return target
