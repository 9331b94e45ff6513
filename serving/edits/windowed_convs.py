"""Windowed convolutions for UNet edits: the latent-resolution blocks computed only near the mask.

Why. A cached UNet edit computes attention only for its masked tokens (`masked_unet`), but the
convolutions ran on the whole latent: on tiny-sd at 512² they were 42 of a cached step's 103 ms
at mask 0.1, the floor that kept the edit speedup under 2× (issue 12). The latent-resolution
level of SDXL-style UNets (and of tiny-sd) has no attention at all — a `DownBlock2D` going down,
an `UpBlock2D` coming up — so there an edit can compute each module only in a box: the latent
mask's bounding box grown by `conv_halo` cells. Outside the box each module's output is the
template's, recorded at registration.

How a box is computed, for a `ResnetBlock2D` (GroupNorm → act → 3×3 conv → +time → GroupNorm →
act → 3×3 conv, plus the shortcut):

- its input over the box grown by two cells: the edit's values inside the box and the
  template's around it (outside the box the map *is* the template's), zero where the image
  ends, as the convolutions' own padding;
- GroupNorm statistics over the whole map the module sees: the template's recorded per-channel
  sums, less the template's inside the box, plus the edit's — exact statistics of the composite
  without touching the map outside the box;
- the downsampler's output (half resolution, where attention runs on the whole map) and the
  final block's output are made whole: the template's map with the computed cells written in.

What is approximated: an edit's influence on the latent-resolution maps outside its box (the
convolutions' reach, the group norms' shift, what the attention level sends back up). Inside
the box nothing is: when an edit's input equals its template's, the windowed blocks reproduce
full compute (tested). Rows without a box — plain and recording rows, edits whose box covers most
of the map, edits of templates recorded without windows — run the modules' own forward on their
sub-batch, so a row's result never depends on what it is batched with.

Supported: UNets whose first down block is a `DownBlock2D` and whose last up block is an
`UpBlock2D` (SDXL, tiny-sd, tiny-sdxl), default ResNet blocks, 3×3 convolutions. SD 1.x/2.x has
attention at the latent resolution; there `WindowedConvs.supported` is False and edits run as
before. ControlNet or T2I-adapter residuals and FreeU turn the windows off for that call.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from stepfleet.serving.edits.masked_unet import MaskedUNet

#: Key prefix of the windowed maps in a template's cached entries.
PREFIX = "w."
#: A box over this fraction of the map computes in full: the crops would cost more than they save.
MAX_BOX_FRACTION = 0.6


@dataclass(frozen=True)
class Box:
    """Rows y0..y1-1, columns x0..x1-1 of a map (may reach past its edges before `clip`)."""

    y0: int
    y1: int
    x0: int
    x1: int

    def grow(self, k: int) -> Box:
        return Box(self.y0 - k, self.y1 + k, self.x0 - k, self.x1 + k)

    def clip(self, h: int, w: int) -> Box:
        return Box(max(0, self.y0), min(h, self.y1), max(0, self.x0), min(w, self.x1))

    def within(self, outer: Box) -> tuple[slice, slice]:
        """This box's cells in the frame of `outer` (which contains it)."""
        return slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0)

    @property
    def area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The box's cells of a (..., H, W) tensor (a view)."""
        return t[..., self.y0:self.y1, self.x0:self.x1]


def mask_box(latent_mask: torch.Tensor, halo: int) -> Box:
    """Bounding box of the mask's cells, grown by `halo` and clipped (an empty mask: an empty box)."""
    h, w = latent_mask.shape
    ys, xs = torch.nonzero(latent_mask, as_tuple=True)
    if ys.numel() == 0:
        return Box(0, 0, 0, 0)
    return Box(int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1).grow(halo).clip(h, w)


def channel_sums(t: torch.Tensor) -> torch.Tensor:
    """(n, 2, C) float64: per-channel sum and sum of squares of (n, C, h, w) — GroupNorm's statistics, summable."""
    t = t.double()
    return torch.stack([t.sum((2, 3)), (t * t).sum((2, 3))], 1)


def composite_sums(whole: torch.Tensor, template_box: torch.Tensor, edit_box: torch.Tensor) -> torch.Tensor:
    """`channel_sums` of a composite map: the template's over the whole map, with its box swapped for the edit's."""
    return whole - channel_sums(template_box) + channel_sums(edit_box)


def write_rows(out: torch.Tensor, rows: Sequence[int], maps: Sequence[torch.Tensor], box: Box,
               cells: torch.Tensor) -> None:
    """Rows `rows` of `out` become the template's `maps` with `cells` written into `box`."""
    for k, row in enumerate(rows):
        out[row].copy_(maps[k])
        box.of(out[row]).copy_(cells[k])


def norm_affine(norm: torch.nn.GroupNorm, sums: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift), (n, C) each, that apply `norm` with the statistics in `sums` over `cells` cells."""
    n, _, c = sums.shape
    g = norm.num_groups
    s = sums.view(n, 2, g, c // g).sum(-1)
    count = cells * (c // g)
    mean = s[:, 0] / count
    rstd = (s[:, 1] / count - mean * mean).clamp_min(0).add(norm.eps).rsqrt()
    mean, rstd = mean.repeat_interleave(c // g, 1), rstd.repeat_interleave(c // g, 1)
    scale = rstd * norm.weight.double() if norm.affine else rstd
    shift = (norm.bias.double() if norm.affine else 0) - mean * scale
    return scale, shift


def apply_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None])


def conv_over(conv: torch.nn.Conv2d, inp: torch.Tensor, inp_box: Box, out_box: Box, h: int, w: int) -> torch.Tensor:
    """A stride-1 k×k convolution (padding k//2) over `out_box` only, from `inp` holding the map over `inp_box`.

    `inp_box` must contain the part of `out_box` grown by k//2 that lies inside the h×w map;
    cells past the map's edge are zeros, as the convolution's own padding.
    """
    p = conv.padding[0]
    need = out_box.grow(p)
    have = need.clip(h, w)
    sub = have.within(inp_box)
    x = F.pad(inp[..., sub[0], sub[1]], (have.x0 - need.x0, need.x1 - have.x1, have.y0 - need.y0, need.y1 - have.y1))
    return F.conv2d(x, conv.weight, conv.bias)


@dataclass(frozen=True)
class Group:
    """Edit rows of one UNet call that share a box, and where each one's template maps are."""

    rows: tuple[int, ...]
    box: Box
    sources: tuple[tuple[dict[str, torch.Tensor], int], ...]  # (cached entry, template row) per row


@dataclass(frozen=True)
class Partition:
    """A UNet call's rows: those computed in full, and the windowed groups."""

    size: int
    dense: tuple[int, ...]
    groups: tuple[Group, ...]


class Outside(Protocol):
    """Where a map's values outside the boxes come from."""

    exact: bool  # the source *is* the map (no box values to paste in)

    def crop(self, g: int, box: Box) -> torch.Tensor: ...

    def sums(self, g: int) -> torch.Tensor: ...


class TemplateMaps:
    """The template's recorded map `key` for each windowed row."""

    exact = False

    def __init__(self, part: Partition, key: str, like: torch.Tensor) -> None:
        self.part, self.key, self.like = part, key, like

    def maps(self, g: int) -> list[torch.Tensor]:
        return [entry[self.key][row] for entry, row in self.part.groups[g].sources]

    def crop(self, g: int, box: Box) -> torch.Tensor:
        return torch.stack([box.of(m) for m in self.maps(g)]).to(device=self.like.device, dtype=self.like.dtype)

    def sums(self, g: int) -> torch.Tensor:
        return torch.stack([entry[self.key + ".s"][row] for entry, row in self.part.groups[g].sources]).to(
            self.like.device)


class WholeMap:
    """A map computed in full for every row (the UNet's input convolution)."""

    exact = True

    def __init__(self, part: Partition, t: torch.Tensor) -> None:
        self.part, self.t = part, t
        self._rows = [torch.tensor(g.rows, device=t.device) for g in part.groups]
        self._sums: dict[int, torch.Tensor] = {}

    def crop(self, g: int, box: Box) -> torch.Tensor:
        return box.of(self.t.index_select(0, self._rows[g]))

    def sums(self, g: int) -> torch.Tensor:
        if g not in self._sums:
            self._sums[g] = channel_sums(self.t.index_select(0, self._rows[g]))
        return self._sums[g]


@dataclass
class Patched:
    """A (B, C, H, W) map of one call: the dense rows in full, each group's values inside its box."""

    part: Partition
    dense: torch.Tensor | None
    crops: list[torch.Tensor]
    outside: Outside
    shape: torch.Size

    @classmethod
    def whole(cls, t: torch.Tensor, part: Partition) -> Patched:
        dense = t.index_select(0, torch.tensor(part.dense, device=t.device)) if part.dense else None
        return cls(part, dense, [], WholeMap(part, t), t.shape)

    def view(self, g: int, region: Box) -> tuple[torch.Tensor, torch.Tensor]:
        """Group g's map over `region` (containing its box) and its per-channel sums over the whole map."""
        base = self.outside.crop(g, region)
        if self.outside.exact:
            return base, self.outside.sums(g)
        ys, xs = self.part.groups[g].box.within(region)
        crop = self.crops[g]
        sums = composite_sums(self.outside.sums(g), base[:, :, ys, xs], crop)
        base[:, :, ys, xs] = crop
        return base, sums

    def materialize(self) -> torch.Tensor:
        """The whole map: the template's outside each box, with the box's values written in."""
        assert isinstance(self.outside, TemplateMaps)
        like = self.crops[0] if self.crops else self.dense
        assert like is not None
        out = like.new_empty(self.shape)
        if self.dense is not None:
            out[list(self.part.dense)] = self.dense
        for g, group in enumerate(self.part.groups):
            write_rows(out, group.rows, self.outside.maps(g), group.box, self.crops[g])
        return out


def _check_resnet(name: str, res: Any) -> None:
    ok = (
        res.upsample is None and res.downsample is None and res.time_embedding_norm == "default"
        and isinstance(res.norm1, torch.nn.GroupNorm) and isinstance(res.norm2, torch.nn.GroupNorm)
        and all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) and c.dilation == (1, 1)
                and c.groups == 1 and c.padding_mode == "zeros" for c in (res.conv1, res.conv2))
        and (res.conv_shortcut is None or res.conv_shortcut.kernel_size == (1, 1))
    )
    if not ok:
        raise NotImplementedError(f"{name}: unsupported ResNet variant")


class WindowedConvs:
    """Installs windowed compute into the latent-resolution blocks of a UNet, driven by a `MaskedUNet`'s calls.

    Installed by `MaskedUNet(..., conv_halo=k)`: recording calls then also store, per recorded
    row, each latent-resolution module's output (and each ResNet block's pre-`norm2` map) with
    their per-channel sums; edit calls compute those modules in their boxes.
    """

    def __init__(self, masked: MaskedUNet, halo: int) -> None:
        from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D

        unet = masked.unet
        self.masked, self.halo = masked, halo
        self.supported = False
        self._positions: Sequence[int] | None = None
        self._hooks: list[Any] = []
        self._forwards: list[Any] = []
        down, ups = unet.down_blocks[0], unet.up_blocks
        if not (isinstance(down, DownBlock2D) and len(ups) >= 2 and isinstance(ups[-1], UpBlock2D)
                and ups[-1].upsamplers is None and down.downsamplers is not None and len(down.downsamplers) == 1
                and ups[-2].upsamplers is not None and len(ups[-2].upsamplers) == 1):
            return
        ds, us = down.downsamplers[0], ups[-2].upsamplers[0]
        if not (ds.use_conv and ds.padding == 1 and ds.norm is None and ds.conv.kernel_size == (3, 3)
                and ds.conv.stride == (2, 2)):
            return
        if not (us.use_conv and us.interpolate and not us.use_conv_transpose and us.norm is None):
            return
        self.up_conv = us.conv if us.name == "conv" else us.Conv2d_0
        if self.up_conv.kernel_size != (3, 3) or self.up_conv.padding != (1, 1):
            return
        try:
            for i, res in enumerate([*down.resnets, *ups[-1].resnets]):
                _check_resnet(f"resnet {i}", res)
        except NotImplementedError:
            return
        self.supported = True
        self.down, self.final, self.downsampler, self.upsampler = down, ups[-1], ds, us
        self.names: dict[torch.nn.Module, str] = {}
        for name, mod in unet.named_modules():
            if mod in (*down.resnets, *ups[-1].resnets, ds, us):
                self.names[mod] = name
        for res in (*down.resnets, *ups[-1].resnets):
            self._hooks.append(res.register_forward_hook(self._record_output))
            self._hooks.append(res.norm2.register_forward_pre_hook(self._record_h1(res)))
        for mod in (ds, us):
            self._hooks.append(mod.register_forward_hook(self._record_output))
        self._hooks.append(unet.register_forward_pre_hook(self._check_call, with_kwargs=True))
        self._install(down, self._down_forward)
        self._install(ups[-1], self._final_forward)
        self._install(us, self._upsample_forward)

    def _install(self, mod: torch.nn.Module, make: Callable[[Any], Callable[..., Any]]) -> None:
        mod.forward = types.MethodType(make(mod.forward), mod)
        self._forwards.append(mod)

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        for mod in self._forwards:
            del mod.forward
        self._hooks.clear()
        self._forwards.clear()

    # -- recording ------------------------------------------------------------------------
    def _store(self, key: str, t: torch.Tensor, sums: bool) -> None:
        call = self.masked._call
        if call is None or not call.records:
            return
        from stepfleet.serving.edits.masked_unet import RecordRow

        positions = self._positions if self._positions is not None else range(t.shape[0])
        for k, i in enumerate(positions):
            r = call.rows[i]
            if isinstance(r, RecordRow):
                self.masked._sink(call, PREFIX + key, r, t[k])
                if sums:
                    self.masked._sink(call, PREFIX + key + ".s", r, channel_sums(t[k:k + 1])[0], keep_dtype=True)

    def _record_output(self, mod: torch.nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Patched):  # the windowed upsampler: its dense rows are the recorded ones
            if out.dense is not None:
                with self._at(out.part.dense):
                    self._store(self.names[mod] + ".out", out.dense, sums=True)
            return
        self._store(self.names[mod] + ".out", out, sums=mod is not self.downsampler)

    def _record_h1(self, res: torch.nn.Module) -> Callable[..., None]:
        def hook(norm: torch.nn.Module, args: Any) -> None:
            self._store(self.names[res] + ".h1", args[0], sums=True)

        return hook

    @contextmanager
    def _at(self, positions: Sequence[int]) -> Iterator[None]:
        """Modules called inside run on the rows `positions` of the call (what recording hooks index)."""
        saved, self._positions = self._positions, positions
        try:
            yield
        finally:
            self._positions = saved

    # -- the call's partition -------------------------------------------------------------
    def _check_call(self, unet: Any, args: Any, kwargs: dict[str, Any]) -> None:
        call = self.masked._call
        if call is None:
            return
        call.windows_off = bool(
            kwargs.get("down_block_additional_residuals") is not None
            or kwargs.get("down_intrablock_additional_residuals") is not None
            or kwargs.get("mid_block_additional_residual") is not None
            or getattr(self.final, "s1", None)
        )

    def partition(self, h: int, w: int) -> Partition | None:
        """This call's windowed groups at h×w (None: no row is windowed), computed once per call."""
        from stepfleet.serving.edits.masked_unet import EditRow

        call = self.masked._call
        if call is None or call.windows_off:
            return None
        if call.partition is not False:
            return call.partition
        by_box: dict[Box, list[tuple[int, tuple[dict[str, torch.Tensor], int]]]] = {}
        dense: list[int] = []
        probe = PREFIX + self.names[self.final.resnets[-1]] + ".out"
        for i, r in enumerate(call.rows):
            entry = call.entries.get((r.template_id, r.step)) if isinstance(r, EditRow) else None
            box = mask_box(r.masks.latent, self.halo) if entry is not None and probe in entry else None
            if box is None or box.area == 0 or box.area > MAX_BOX_FRACTION * h * w or r.masks.latent.shape != (h, w):
                dense.append(i)
            else:
                by_box.setdefault(box, []).append((i, (entry, r.cache_row)))
        part = None
        if by_box:
            groups = tuple(Group(tuple(i for i, _ in m), box, tuple(s for _, s in m)) for box, m in by_box.items())
            part = Partition(len(call.rows), tuple(dense), groups)
        call.partition = part
        return part

    # -- the windowed modules -------------------------------------------------------------
    def _resnet(self, res: Any, parts: Sequence[Patched], temb: torch.Tensor | None, part: Partition) -> Patched:
        first = parts[0]
        h, w = first.shape[-2:]
        out_dense = None
        if part.dense:
            x = torch.cat([p.dense for p in parts], 1) if len(parts) > 1 else parts[0].dense
            t = temb[list(part.dense)] if temb is not None else None
            with self._at(part.dense):
                out_dense = res(x, t)
        t_all = None
        if temb is not None and res.time_emb_proj is not None:
            t_all = res.time_emb_proj(temb if res.skip_time_act else res.nonlinearity(temb))
        h1_key = PREFIX + self.names[res] + ".h1"
        crops = []
        for g, group in enumerate(part.groups):
            box = group.box
            r2, r1 = box.grow(2).clip(h, w), box.grow(1).clip(h, w)
            views = [p.view(g, r2) for p in parts]
            x = torch.cat([v for v, _ in views], 1) if len(views) > 1 else views[0][0]
            sums = torch.cat([s for _, s in views], 2) if len(views) > 1 else views[0][1]
            a = res.nonlinearity(apply_affine(x, *norm_affine(res.norm1, sums, h * w)))
            h1 = conv_over(res.conv1, a, r2, r1, h, w)
            if t_all is not None:
                h1 = h1 + t_all[list(group.rows)][:, :, None, None]
            ys, xs = box.within(r1)
            t1 = TemplateMaps(part, h1_key, h1)
            sums2 = composite_sums(t1.sums(g), t1.crop(g, box), h1[:, :, ys, xs])
            a2 = res.nonlinearity(apply_affine(h1, *norm_affine(res.norm2, sums2, h * w)))
            h2 = conv_over(res.conv2, a2, r1, box, h, w)
            ys, xs = box.within(r2)
            xb = x[:, :, ys, xs]
            if res.conv_shortcut is not None:
                xb = res.conv_shortcut(xb)
            crops.append((xb + h2) / res.output_scale_factor)
        like = crops[0] if crops else out_dense
        shape = torch.Size((part.size, res.conv2.out_channels, h, w))
        return Patched(part, out_dense, crops, TemplateMaps(part, PREFIX + self.names[res] + ".out", like), shape)

    def _down_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(block: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kw: Any):
            part = self.partition(*hidden_states.shape[-2:])
            if part is None:
                return original(hidden_states, temb, *args, **kw)
            p = Patched.whole(hidden_states, part)
            states: tuple[Any, ...] = ()
            for res in block.resnets:
                p = self._resnet(res, [p], temb, part)
                states += (p,)
            out = self._downsample(p, part)
            return out, (*states, out)

        return forward

    def _downsample(self, p: Patched, part: Partition) -> torch.Tensor:
        """The half-resolution map, whole: dense rows by the module, windowed rows as the template's with
        the cells the box reaches recomputed."""
        ds, conv = self.downsampler, self.downsampler.conv
        h, w = p.shape[-2:]
        ho, wo = (h + 1) // 2, (w + 1) // 2
        key = PREFIX + self.names[ds] + ".out"
        out = None
        if p.dense is not None:
            with self._at(part.dense):
                dense = ds(p.dense)
            out = dense.new_empty((part.size, *dense.shape[1:]))
            out[list(part.dense)] = dense
        for g, group in enumerate(part.groups):
            b = group.box
            o = Box(b.y0 // 2, min(ho, b.y1 // 2 + 1), b.x0 // 2, min(wo, b.x1 // 2 + 1))
            need = Box(2 * o.y0 - 1, 2 * o.y1, 2 * o.x0 - 1, 2 * o.x1)
            have = need.clip(h, w)
            x, _ = p.view(g, have)
            x = F.pad(x, (have.x0 - need.x0, need.x1 - have.x1, have.y0 - need.y0, need.y1 - have.y1))
            cells = F.conv2d(x, conv.weight, conv.bias, stride=2)
            maps = TemplateMaps(part, key, cells).maps(g)
            if out is None:
                out = cells.new_empty((part.size, cells.shape[1], ho, wo))
            write_rows(out, group.rows, maps, o, cells)
        assert out is not None
        return out

    def _upsample_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(up: Any, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kw: Any):
            h, w = 2 * hidden_states.shape[-2], 2 * hidden_states.shape[-1]
            part = self.partition(h, w)
            if part is None or (output_size is not None and tuple(output_size) != (h, w)):
                return original(hidden_states, output_size, *args, **kw)
            dense = None
            if part.dense:
                with self._at(part.dense):
                    dense = original(hidden_states[list(part.dense)], output_size)
            conv, crops = self.up_conv, []
            for group in part.groups:
                box = group.box
                need = box.grow(1)
                have = need.clip(h, w)
                src = Box(have.y0 // 2, (have.y1 - 1) // 2 + 1, have.x0 // 2, (have.x1 - 1) // 2 + 1)
                x = F.interpolate(src.of(hidden_states[list(group.rows)]), scale_factor=2.0, mode="nearest")
                x = x[..., have.y0 - 2 * src.y0:have.y1 - 2 * src.y0, have.x0 - 2 * src.x0:have.x1 - 2 * src.x0]
                x = F.pad(x, (have.x0 - need.x0, need.x1 - have.x1, have.y0 - need.y0, need.y1 - have.y1))
                crops.append(F.conv2d(x, conv.weight, conv.bias))
            like = crops[0]
            return Patched(part, dense, crops, TemplateMaps(part, PREFIX + self.names[up] + ".out", like),
                           torch.Size((part.size, conv.out_channels, h, w)))

        return forward

    def _final_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(block: Any, hidden_states: Any, res_hidden_states_tuple: tuple[Any, ...],
                    temb: torch.Tensor | None = None, upsample_size: Any = None, *args: Any, **kw: Any):
            if not isinstance(hidden_states, Patched):
                return original(hidden_states, res_hidden_states_tuple, temb, upsample_size, *args, **kw)
            part, p, skips = hidden_states.part, hidden_states, res_hidden_states_tuple
            for res in block.resnets:
                skip, skips = skips[-1], skips[:-1]
                skip = skip if isinstance(skip, Patched) else Patched.whole(skip, part)
                p = self._resnet(res, [p, skip], temb, part)
            return p.materialize()

        return forward
