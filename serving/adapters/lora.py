"""LoRA files → per-module low-rank factors of one denoiser, checked against it.

Key layouts differ by trainer: kohya/A1111 (`lora_unet_down_blocks_0_..._to_q.lora_down.weight`
with `.alpha`), diffusers' older `unet.…to_q.lora.down.weight`, and PEFT's
`unet.…to_q.lora_A.weight` (optionally with a LoraConfig in the safetensors metadata). We do
not reimplement any of them: diffusers' own conversion (`lora_state_dict`, then
`convert_unet_state_dict_to_peft` and `get_peft_kwargs`) turns every layout into PEFT names,
ranks and alphas, and PEFT's own pattern matching picks each module's rank and alpha — the
exact steps `load_lora_weights` takes, so a module's scaling here is the one PEFT would set.

What we keep is plain: for each LoRA-ed `Linear`/`Conv2d` of the denoiser its `down` (A) and
`up` (B) weights and `alpha / r`. The file is checked against the served model before it
is accepted: a key for a module the denoiser does not have, or whose shapes do not fit it,
is an `AdapterError` 422 naming the first such key (an SDXL LoRA offered to an SD 1.5 model
fails here); so are text-encoder keys — a per-request text encoder is not supported (prompt
encoding runs once per request with the shared encoder), and silently dropping part of an
adapter would draw something other than its author trained. DoRA and LoRA biases are
refused the same way. A file that is not safetensors is a 400.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Family → (diffusers' LoRA loader mixin whose conversion is the reference, the denoiser's prefix).
FAMILY_LOADERS: dict[str, tuple[str, str]] = {
    "sd15": ("StableDiffusionLoraLoaderMixin", "unet"),
    "sd2": ("StableDiffusionLoraLoaderMixin", "unet"),
    "sdxl": ("StableDiffusionXLLoraLoaderMixin", "unet"),
    "sd3": ("SD3LoraLoaderMixin", "transformer"),
    "flux": ("FluxLoraLoaderMixin", "transformer"),
}
#: diffusers' safetensors metadata key holding a LoraConfig as JSON.
METADATA_KEY = "lora_adapter_metadata"


class AdapterError(ValueError):
    """An adapter the worker cannot use; `status` is the HTTP answer, `key` the offending tensor."""

    def __init__(self, status: int, message: str, key: str | None = None, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.key = key
        self.code = code


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank delta: `up(down(x)) * scaling`, as PEFT's LoRA layer computes it."""

    down: torch.Tensor  # A: (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    scaling: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    #: Conv2d only: the base layer's stride and padding, which PEFT gives `down`.
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | str | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled low-rank output for rows `x` of the base layer's input."""
        if self.stride is None:
            return F.linear(F.linear(x, self.down), self.up)
        return F.conv2d(F.conv2d(x, self.down, None, self.stride, self.padding), self.up)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraLayer:
        return LoraLayer(self.down.to(device, dtype), self.up.to(device, dtype), self.scaling, self.stride,
                         self.padding)

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """An adapter's layers, keyed by the denoiser's module names."""

    layers: Mapping[str, LoraLayer]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def rank(self) -> int:
        return max((int(layer.down.shape[0]) for layer in self.layers.values()), default=0)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraWeights:
        return LoraWeights({k: v.to(device, dtype) for k, v in self.layers.items()})


def read_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; anything else is an `AdapterError` 400."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if len(data) < 8:
        raise AdapterError(400, "not a safetensors file (too short)", code="invalid_file")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        if size > len(data) - 8:
            raise ValueError("header longer than the file")
        header = json.loads(data[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        tensors = load(data)
    except (ValueError, SafetensorError, UnicodeDecodeError) as exc:
        raise AdapterError(400, f"not a readable safetensors file: {exc}", code="invalid_file") from None
    meta = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: str,
               denoiser: torch.nn.Module) -> LoraWeights:
    """Convert any supported layout with diffusers' own code and check it against `denoiser`.

    Raises `AdapterError` 422 naming the first key the denoiser cannot take.
    """
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft.utils.other import get_pattern_key

    if family not in FAMILY_LOADERS:
        raise AdapterError(422, f"LoRA adapters are not supported for family {family!r}", code="unsupported_family")
    if not tensors:
        raise AdapterError(422, "the file holds no tensors", code="invalid_adapter")
    dora = next((k for k in tensors if "dora_scale" in k or "lora_magnitude_vector" in k), None)
    if dora is not None:  # diffusers drops kohya's dora_scale with a warning: that would serve another adapter
        raise AdapterError(422, f"key {dora!r}: DoRA adapters are not supported (only plain LoRA)", key=dora)
    loader_name, prefix = FAMILY_LOADERS[family]
    loader = getattr(diffusers.loaders, loader_name)
    config = getattr(denoiser, "config", None)
    extra: dict = {"unet_config": config} if prefix == "unet" else {}
    if loader_name == "FluxLoraLoaderMixin":
        extra["return_alphas"] = True
    try:
        out = loader.lora_state_dict(dict(tensors), **extra)
        state, alphas = out if isinstance(out, tuple) else (out, None)
    except (KeyError, ValueError, IndexError, RuntimeError) as exc:
        first = next(iter(tensors))
        raise AdapterError(422, f"not a LoRA layout diffusers knows ({type(exc).__name__}: {exc}); first key "
                           f"{first!r}", key=first) from None
    others = [k for k in state if not k.startswith(f"{prefix}.")]
    if others:
        kind = "text-encoder" if others[0].startswith("text_encoder") else "unknown"
        raise AdapterError(422, f"{kind} LoRA key {others[0]!r}: only the denoiser ({prefix}) can take adapters "
                           "on this worker", key=others[0])
    state = {k.removeprefix(f"{prefix}."): v for k, v in state.items()}
    alphas = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items() if k.startswith(f"{prefix}.")}
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    for key in state:
        if "lora_magnitude_vector" in key or key.endswith(".bias") or not (".lora_A." in key or ".lora_B." in key):
            raise AdapterError(422, f"key {key!r}: only plain LoRA (A and B weights) is supported (no DoRA, "
                               "no LoRA bias)", key=key)
    kwargs = _config(state, alphas, metadata, prefix, get_peft_kwargs)
    r0, alpha0 = kwargs.get("r", 8), kwargs.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = kwargs.get("rank_pattern") or {}, kwargs.get("alpha_pattern") or {}
    rslora = bool(kwargs.get("use_rslora", False))
    layers: dict[str, LoraLayer] = {}
    for module_name in sorted({k.split(".lora_")[0] for k in state}):
        down_key, up_key = f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"
        if down_key not in state or up_key not in state:
            missing = up_key if down_key in state else down_key
            raise AdapterError(422, f"key {missing!r} is missing (LoRA needs both A and B)", key=missing)
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), r0)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), alpha0)
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        layers[module_name] = _checked(denoiser, module_name, state[down_key], state[up_key], float(scaling))
    return LoraWeights(layers)


def _config(state: Mapping[str, torch.Tensor], alphas: Mapping[str, float], metadata: Mapping[str, str],
            prefix: str, get_peft_kwargs) -> dict:
    """LoraConfig kwargs: the file's own (diffusers' metadata) or inferred as `load_lora_adapter` does."""
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise AdapterError(400, f"metadata {METADATA_KEY!r} is not JSON", code="invalid_file") from None
        own = {k.removeprefix(f"{prefix}."): v for k, v in meta.items() if k.startswith(f"{prefix}.")}
        if own:
            return own
    rank = {f"^{k}": int(v.shape[1]) for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    return get_peft_kwargs(rank, network_alpha_dict=dict(alphas) or None, peft_state_dict=state, is_unet=True)


def _checked(denoiser: torch.nn.Module, name: str, down: torch.Tensor, up: torch.Tensor, scaling: float) -> LoraLayer:
    """The layer for module `name`, or `AdapterError` 422 when the denoiser has no such module or its
    shapes differ (an adapter of another architecture)."""
    try:
        module = denoiser.get_submodule(name)
    except AttributeError:
        raise AdapterError(422, f"key {name}.lora_A.weight: the served model has no module {name!r} (an adapter "
                           "for another model family or architecture?)", key=f"{name}.lora_A.weight") from None
    r = int(down.shape[0]) if down.ndim else 0
    if isinstance(module, torch.nn.Linear):
        want_down, want_up = (r, module.in_features), (module.out_features, r)
        geometry: dict = {}
    elif isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.dilation == (1, 1):
        want_down = (r, module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, r, 1, 1)
        geometry = {"stride": tuple(module.stride), "padding": module.padding}
    else:
        raise AdapterError(422, f"key {name}.lora_A.weight: module {name!r} is a {type(module).__name__}; LoRA is "
                           "supported on Linear and plain Conv2d layers", key=f"{name}.lora_A.weight")
    if up.ndim == 2 and len(want_up) == 4:  # a linear-shaped B for a 1x1-only up projection
        up = up[:, :, None, None]
    for key, got, want in ((f"{name}.lora_A.weight", down, want_down), (f"{name}.lora_B.weight", up, want_up)):
        if tuple(got.shape) != want:
            raise AdapterError(422, f"key {key}: shape {tuple(got.shape)} does not fit the served model's "
                               f"{type(module).__name__} (expected {want})", key=key)
    return LoraLayer(down.detach().float().contiguous(), up.detach().float().contiguous(), scaling, **geometry)
