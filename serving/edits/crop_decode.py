"""Decode only an edit's neighbourhood: a latent crop around the mask, pasted onto the template.

An edit's image is the template's pixels outside the pixel mask (`masks.composite`), so only
the decoded pixels *inside* the mask are ever shown. Decoding the whole latent to show a small
masked area wastes most of the VAE decode, which at large sizes costs more than all the cached
denoising steps together (tiny-sd3 at 1024²: 2.8 s decode vs 0.4 s of steps). This room picks
a latent crop — the mask's bounding box grown by `margin` latent cells, clipped to the latent —
decodes only that, and pastes its masked pixels onto the template's.

The decoder is convolutional except for its GroupNorms' statistics and one mid-block
self-attention (SD/SDXL/SD3/Flux `AutoencoderKL`s). So the crop is cut *after* the mid-block,
which runs on the whole latent (latent resolution: cheap); the up path, where the decode spends
its time, runs on the crop only, its GroupNorms normalising with the whole image's statistics —
the template's recorded sums outside the mask's blocks plus the crop's own inside them
(`NormStats`, recorded when the template is registered). For unchanged latents that is the full
decode up to rounding; for an edit it is an approximation inside the mask (the edit also moves
the features outside it, through the mid-block's attention), measured by `training/measure_crop.py`,
which chose `DEFAULT_MARGIN` (docs/benchmarks.md). Outside the mask the pixels are the
template's either way: exact. A crop over `max_fraction` of the latent saves little, so that
edit decodes in full, as does an edit without a template (no statistics).

Pure logic (the boxes, the sums, the paste) and forward hooks; the decode itself is the
backbone's, passed in as a closure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

#: Latent cells of context around the mask's bounding box. With the template's statistics the
#: error on the trained mini-sd VAE stops falling at 2–4 cells (`training/measure_crop.py`, docs/benchmarks.md).
DEFAULT_MARGIN = 4
#: Decode in full when the crop would be more than this fraction of the latent's cells (when crop
#: decoding is on; the worker's default is off, `--edit-crop-max-fraction 0`).
DEFAULT_MAX_FRACTION = 0.5


@dataclass(frozen=True)
class CropDecode:
    """The crop-decode setting: `margin` latent cells around the mask; `max_fraction` of the latent
    beyond which the edit decodes in full (0 turns crop decoding off)."""

    margin: int = DEFAULT_MARGIN
    max_fraction: float = DEFAULT_MAX_FRACTION
    block: int = 1  # align the crop to blocks of this many cells (`NormStats.block`)

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"crop-decode block must be >= 1, got {self.block}")
        if self.margin < 0:
            raise ValueError(f"crop-decode margin must be >= 0, got {self.margin}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"crop-decode max_fraction must be in [0, 1], got {self.max_fraction}")


@dataclass(frozen=True)
class CropBox:
    """A latent rectangle, half-open: rows [top, bottom), columns [left, right)."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def cells(self) -> int:
        return (self.bottom - self.top) * (self.right - self.left)

    def pixels(self, scale: int) -> tuple[slice, slice]:
        """The (rows, columns) slices of the image this latent crop decodes to."""
        return slice(self.top * scale, self.bottom * scale), slice(self.left * scale, self.right * scale)


def crop_box(latent_mask: torch.Tensor, setting: CropDecode) -> CropBox | None:
    """The crop to decode for a (h, w) bool latent mask, or None: decode in full (an empty mask,
    or a crop over `setting.max_fraction` of the latent)."""
    h, w = latent_mask.shape[-2:]
    m = latent_mask.reshape(h, w)
    rows = torch.nonzero(m.any(dim=1)).flatten()
    cols = torch.nonzero(m.any(dim=0)).flatten()
    if rows.numel() == 0:
        return None
    g, q = setting.margin, setting.block
    box = CropBox(max(0, int(rows[0]) - g) // q * q, max(0, int(cols[0]) - g) // q * q,
                  min(h, -(-(int(rows[-1]) + 1 + g) // q) * q), min(w, -(-(int(cols[-1]) + 1 + g) // q) * q))
    if box.cells > setting.max_fraction * h * w:
        return None
    return box


def paste(crop_image, base: np.ndarray, pixel_mask: np.ndarray, box: CropBox, scale: int):
    """The template `base` (H, W, 3) with the decoded crop's pixels inside the mask.

    `crop_image` is a PIL image (then `base` is uint8 and a PIL image is returned) or an
    (h, w, 3) float array (then `base` is float in [0, 1] and an array is returned) — what
    `composite` would return for the full decode, with the crop standing in for it.
    """
    is_pil = hasattr(crop_image, "convert")
    crop = np.asarray(crop_image.convert("RGB")) if is_pil else np.asarray(crop_image)
    ys, xs = box.pixels(scale)
    out = base.copy()
    region = out[ys, xs]
    if crop.shape != region.shape:
        raise ValueError(f"decoded crop {crop.shape} does not match its region {region.shape}")
    out[ys, xs] = np.where(pixel_mask[ys, xs][..., None], crop, region)
    if is_pil:
        from PIL import Image

        return Image.fromarray(out.astype(np.uint8))
    return out


def vae_decoder(vae: object) -> torch.nn.Module | None:
    """The decoder whose mid-block output a crop decode cuts, or None where that does not apply
    (not an `AutoencoderKL`-style decoder, or a VAE set to decode in tiles)."""
    from diffusers import AutoencoderKL

    if not isinstance(vae, AutoencoderKL) or vae.use_tiling:
        return None
    return vae.decoder


#: Latent cells per side of a block of the template's recorded GroupNorm sums (a crop is aligned to
#: blocks): 4 keeps a 512² template's sums near 1 MB on an SD VAE and widens a crop by < 4 cells.
STATS_BLOCK = 4


@dataclass
class NormStats:
    """A template decode's up-path GroupNorm inputs, summed per group over blocks of latent cells.

    `sums[name]` = (Σx, Σx²), each (groups, ⌈h/block⌉, ⌈w/block⌉) float64, for a latent of h×w
    cells. With them a crop decode normalises as the full decode of the edit would, up to how
    the edit moved the features outside the crop: the whole image's sums are the template's
    outside the crop plus the edit's own inside it.
    """

    h: int
    w: int
    block: int = STATS_BLOCK
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _up_norms(decoder: torch.nn.Module) -> list[tuple[str, torch.nn.GroupNorm]]:
    """The GroupNorms that a crop decode runs on the crop only: the up blocks' and the output's."""
    norms = [(f"up_blocks.{n}", m) for n, m in decoder.up_blocks.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    if isinstance(getattr(decoder, "conv_norm_out", None), torch.nn.GroupNorm):
        norms.append(("conv_norm_out", decoder.conv_norm_out))
    return norms


def _block_sums(x: torch.Tensor, groups: int, px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σx, Σx²) of one image's (C, H, W) features per group over px×px pixel blocks."""
    c, hh, ww = x.shape[-3:]
    x = x.reshape(groups, c // groups, hh, ww).double()
    ph, pw = -hh % px, -ww % px
    x = torch.nn.functional.pad(x, (0, pw, 0, ph))  # zeros add nothing to a sum
    blocks = x.reshape(groups, c // groups, (hh + ph) // px, px, (ww + pw) // px, px)
    return blocks.sum(dim=(1, 3, 5)), (blocks * blocks).sum(dim=(1, 3, 5))


@contextmanager
def recording_norm_stats(decoder: torch.nn.Module, into: NormStats) -> Iterator[None]:
    """Within this block a decode of one image's latents (`into.h`×`into.w`) stores its up path's
    GroupNorm sums in `into`."""
    def hook(name: str):
        def record(module: torch.nn.GroupNorm, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            px = into.block * (x.shape[-2] // into.h)
            into.sums[name] = _block_sums(x[0], module.num_groups, px)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _up_norms(decoder)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def whole_image_norms(decoder: torch.nn.Module, stats: NormStats, box: CropBox, inner: CropBox) -> Iterator[None]:
    """Within this block the up path's GroupNorms, seeing the crop `box` only, normalise with the
    whole image's statistics: the crop's own sums over `inner` (the mask's blocks, where the
    edit changed the features) and the template's everywhere else.

    Measured on the trained mini-sd VAE: a crop normalised with its own statistics stays near
    22–25 dB inside a 0.1 mask however wide its margin, because the full decode normalises with
    the whole image's. The crop's own sums are taken over `inner` only since its features near
    the crop's edge are off (the convolutions' zero padding stands in for the context).
    Both boxes must be aligned to `stats.block` (`crop_box` does it).
    """
    q = stats.block
    tb, lb, bb, rb = inner.top // q, inner.left // q, -(-inner.bottom // q), -(-inner.right // q)
    dy, dx = inner.top - box.top, inner.left - box.left

    def hook(name: str):
        total_s, total_ss = (t.sum(dim=(1, 2)) for t in stats.sums[name])
        crop_s, crop_ss = (t[:, tb:bb, lb:rb].sum(dim=(1, 2)) for t in stats.sums[name])

        def replace(module: torch.nn.GroupNorm, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            b, c = x.shape[:2]
            g = module.num_groups
            scale = x.shape[-2] // (box.bottom - box.top)
            n = (c // g) * stats.h * stats.w * scale * scale
            own = x[..., dy * scale : (dy + inner.bottom - inner.top) * scale,
                    dx * scale : (dx + inner.right - inner.left) * scale].reshape(b, g, -1).double()
            s = total_s - crop_s + own.sum(dim=-1)
            ss = total_ss - crop_ss + (own * own).sum(dim=-1)
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0)
            shape = (b, g) + (1,) * (x.dim() - 1)
            y = (x.reshape(b, g, -1, *x.shape[2:]) - mean.to(x.dtype).reshape(shape)) * torch.rsqrt(
                var.to(x.dtype).reshape(shape) + module.eps)
            y = y.reshape_as(x)
            if module.affine:
                shape = (1, c) + (1,) * (x.dim() - 2)
                y = y * module.weight.reshape(shape) + module.bias.reshape(shape)
            return y
        return replace

    handles = [m.register_forward_hook(hook(n)) for n, m in _up_norms(decoder) if n in stats.sums]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def cropped_after_mid_block(decoder: torch.nn.Module, box: CropBox) -> Iterator[None]:
    """Within this block the decoder's up blocks see only `box` of the mid-block's output (which
    is at latent resolution), so a decode of the full latents yields the crop's pixels only."""
    def cut(_module: torch.nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        return out[..., box.top : box.bottom, box.left : box.right]

    handle = decoder.mid_block.register_forward_hook(cut)
    try:
        yield
    finally:
        handle.remove()


def decode_edit(decode: Callable[[], list | np.ndarray], decoder: torch.nn.Module, box: CropBox,
                base_image, pixel_mask: torch.Tensor, latent_h: int, stats: NormStats | None = None,
                inner: CropBox | None = None) -> list | np.ndarray:
    """`decode()` (of the full latents) with `decoder` cut to `box` after its mid-block, each image
    pasted onto `base_image` (PIL) inside the mask.

    The decoder's input convolution and mid-block (its one self-attention, at latent resolution:
    cheap) see the whole latent; the up blocks, where the decode spends its time, see the crop
    only, so what differs from a full decode inside the mask is the up blocks' GroupNorm
    statistics and their convolutions' context at the crop's edge (hence the margin). `stats`
    (the template's, `recording_norm_stats`) with `inner` (the mask's own blocks) give the
    whole image's statistics (`whole_image_norms`); without them the crop normalises by its own.
    """
    norms = whole_image_norms(decoder, stats, box, inner or box) if stats else nullcontext()
    with cropped_after_mid_block(decoder, box), norms:
        images = decode()
    mask = pixel_mask.cpu().numpy().astype(bool)
    scale = mask.shape[0] // latent_h
    rgb = np.asarray(base_image.convert("RGB"))
    if isinstance(images, list):
        return [paste(im, rgb, mask, box, scale) for im in images]
    base = rgb.astype(np.float32) / 255.0
    return np.stack([paste(im, base, mask, box, scale) for im in images])
