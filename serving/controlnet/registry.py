"""Registered ControlNets: the worker's `--controlnets` entries, loaded through `from_pretrained`.

Loaded once at start-up beside the model, in its device and dtype, and checked against its UNet
(cross-attention width and added conditioning must match, or its residuals could not enter the
UNet): a net that does not fit fails loading, reported on `/readyz`, rather than a request.
Read-only afterwards, so the step loop and an overlapping executor may share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stepfleet.serving.controlnet import BUILTIN_CONTROLNETS
from stepfleet.serving.controlnet.spec import ControlNetEntry

if TYPE_CHECKING:
    from diffusers import ControlNetModel


class ControlNetMismatch(ValueError):
    """A registered ControlNet does not fit the served model's UNet."""


@dataclass(frozen=True)
class LoadedControlNet:
    entry: ControlNetEntry
    net: ControlNetModel


def load_controlnet(source: str, device: torch.device | str, dtype: torch.dtype,
                    local_files_only: bool | None = None) -> ControlNetModel:
    """A ControlNet from a built-in name, a local `save_pretrained` directory or a hub id."""
    from diffusers import ControlNetModel

    path = source
    local = local_files_only
    if source in BUILTIN_CONTROLNETS:
        from stepfleet.serving.controlnet.builtins import ensure_controlnet

        path, local = str(ensure_controlnet(source)), True
    kwargs = {"local_files_only": True} if local else {}
    net = ControlNetModel.from_pretrained(path, torch_dtype=dtype, **kwargs)
    return net.to(device).eval().requires_grad_(False)


def check_fits(name: str, net: torch.nn.Module, unet: torch.nn.Module) -> None:
    """Raise `ControlNetMismatch` when `net`'s residuals cannot enter `unet`."""
    for key in ("cross_attention_dim", "addition_embed_type", "block_out_channels", "in_channels"):
        a, b = getattr(net.config, key, None), getattr(unet.config, key, None)
        if key == "block_out_channels":
            a, b = tuple(a or ()), tuple(b or ())
        if a != b:
            raise ControlNetMismatch(f"ControlNet {name!r} does not fit the model: its {key} is {a!r}, "
                                     f"the UNet's {b!r}")


class ControlNetRegistry:
    """Names → loaded ControlNets; what `GET /v1/controlnets` lists and the extension runs."""

    def __init__(self, loaded: Sequence[LoadedControlNet] = ()) -> None:
        self._by_name = {item.entry.name: item for item in loaded}

    @classmethod
    def load(cls, entries: Sequence[ControlNetEntry], unet: torch.nn.Module,
             local_files_only: bool | None = None) -> ControlNetRegistry:
        loaded = []
        for entry in entries:
            net = load_controlnet(entry.source, unet.device, unet.dtype, local_files_only)
            check_fits(entry.name, net, unet)
            loaded.append(LoadedControlNet(entry, net))
        return cls(loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def net(self, name: str) -> ControlNetModel:
        return self._by_name[name].net

    def entries(self) -> tuple[ControlNetEntry, ...]:
        return tuple(item.entry for item in self._by_name.values())
