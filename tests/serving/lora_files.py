"""Test LoRA files with seeded, non-zero weights (PEFT initialises B to zero: a no-op adapter).

`lora_tensors(unet, ...)` writes the same adapter in diffusers' PEFT layout or kohya's
(A1111) layout, so both paths through diffusers' conversion are exercised.
"""

from __future__ import annotations

import torch
from safetensors.torch import save

#: What a typical LoRA trains: attention projections and feed-forward, plus the resnets' convs
#: and time projections here, so Conv2d and Linear deltas are both checked.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "conv1", "conv2",
           "time_emb_proj")


def target_modules(unet: torch.nn.Module, targets=TARGETS) -> list[str]:
    return [n for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith(t) for t in targets)]


def lora_tensors(unet: torch.nn.Module, rank: int = 4, seed: int = 0, std: float = 0.15, layout: str = "peft",
                 alpha: float | None = None, targets=TARGETS, prefix: str = "unet") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in target_modules(unet, targets):
        m = unet.get_submodule(name)
        if isinstance(m, torch.nn.Linear):
            a = torch.randn(rank, m.in_features, generator=g) * std
            b = torch.randn(m.out_features, rank, generator=g) * std
        else:
            a = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * std
            b = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std
        if layout == "peft":
            out[f"{prefix}.{name}.lora_A.weight"], out[f"{prefix}.{name}.lora_B.weight"] = a, b
        else:
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a, b
            out[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return out


def lora_bytes(unet: torch.nn.Module, **kwargs) -> bytes:
    return save({k: v.contiguous() for k, v in lora_tensors(unet, **kwargs).items()})
