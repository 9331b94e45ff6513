"""Masked compute for diffusers' `UNet2DConditionModel`: record a template, then edit only masked tokens.

How a step of an edit differs from a full step. Convolutions (ResNet blocks, down/upsamplers)
run on the whole latent as usual. Each attention block (`Transformer2DModel`) computes

    out = x + proj_out(blocks(proj_in(GroupNorm(x))))        # "contribution" = proj_out(...)

and everything in it is per token except two things: GroupNorm's statistics (over all
tokens) and self-attention (queries attend to all keys). So in EDIT mode a block

1. runs GroupNorm over all tokens, then gathers the masked tokens (the sample's token mask at
   this resolution, halo included) and runs proj_in, LayerNorms, cross-attention and the
   feed-forward only on them;
2. in self-attention computes queries for the masked tokens only, and keys/values for them
   too, written over the template's cached keys/values of the same step ("masked rows
   refreshed"); the masked queries then attend to all tokens;
3. writes proj_out of the masked tokens into (a copy of) the template's cached contribution
   and adds the block's input as the residual. Unmasked tokens thus keep the template's
   contribution on top of the edit's own residual stream.

With a mask covering everything, nothing cached is used and the result is full compute
(up to float rounding: a 1×1 convolution becomes a matmul), which the tests check.

RECORD mode is full compute that also stores, per step, every block's contribution and its
self-attention keys/values (all tokens) into a `TemplateCache` entry keyed (template, step).

Integration (the runner's one UNet call per step)
------------------------------------------------
`MaskedUNet(unet, cache)` installs itself into the UNet once (a wrapper around each
`Transformer2DModel.forward` and a processor on each self-attention); with no plan active
the UNet behaves exactly as before. Per call, the runner passes one entry per UNet *row*
(after classifier-free guidance doubled the batch), aligned with `sample`:

    rows[i] = None                      plain generation: full compute
            | RecordRow(tid, step, r)   full compute, and store row i as row r of the entry
            | EditRow(tid, step, masks, r)  masked compute from row r of the template's entry

`expand_rows(plan, n, cfg, template_rows)` turns a request's plan into its rows in
`ModelRunner.step`'s order (uncond×n, then cond×n). Rows of any kinds, templates and mask
ratios mix in one call; edit rows are gathered with padding to the largest mask. Before the
call, `fetch(rows)` takes the cached entries the edits need and names those no longer cached
(the edits extension then falls back to full compute for that request); `active(rows,
entries)` wraps the UNet call, and on leaving stores recordings and prefetches the next step
of every edited template. All rows of one recorded (template, step) must be in the same call.

Supported: continuous-input `Transformer2DModel`s with layer-norm `BasicTransformerBlock`s
(SD 1.x/2.x and the tiny test model). Not thread-safe: one UNet call at a time (the step loop).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.masks import TokenMasks
from stepfleet.serving.edits.windowed_convs import WindowedConvs


@dataclass(frozen=True)
class RecordRow:
    """Full compute; store this row's activations as row `cache_row` of the (template, step) entry."""

    template_id: str
    step: int
    cache_row: int = 0


@dataclass(frozen=True)
class EditRow:
    """Masked compute against row `cache_row` of the template's entry for `step`."""

    template_id: str
    step: int
    masks: TokenMasks
    cache_row: int = 0


Row = RecordRow | EditRow | None
#: Cached tensors by (template id, step), as `TemplateCache.get` returns them.
Entries = dict[tuple[str, int], dict[str, torch.Tensor]]


def fetch_entries(cache: TemplateCache, rows: Sequence[Row]) -> tuple[Entries, set[tuple[str, int]]]:
    """The cached (template, step) entries the edit rows need, and the keys that are gone; shared
    by the UNet and DiT masked-compute paths."""
    entries: Entries = {}
    missing: set[tuple[str, int]] = set()
    for r in rows:
        key = (r.template_id, r.step) if isinstance(r, EditRow) else None
        if key is None or key in entries or key in missing:
            continue
        got = cache.get(*key)
        if got is None:
            missing.add(key)
        else:
            entries[key] = got
    return entries, missing


def expand_rows(
    plan: RecordRow | EditRow | None, n: int, cfg: bool, template_rows: int = 2
) -> list[Row]:
    """A request's plan → its UNet rows, in `ModelRunner.step` order ([uncond]*n + [cond]*n with CFG).

    `template_rows` is how many rows the template recorded (2 with guidance, 1 without). An
    edit with guidance of a template recorded with guidance maps uncond→0 and cond→1;
    otherwise every row uses the template's last (conditional) row.
    """
    if plan is None:
        return [None] * (2 * n if cfg else n)
    if isinstance(plan, RecordRow):
        return (
            [replace(plan, cache_row=0)] * n + [replace(plan, cache_row=1)] * n
            if cfg
            else [plan] * n
        )
    if cfg and template_rows >= 2:
        return [replace(plan, cache_row=0)] * n + [replace(plan, cache_row=1)] * n
    last = replace(plan, cache_row=template_rows - 1)
    return [last] * (2 * n if cfg else n)


class TemplateMissingError(KeyError):
    """An edit row's (template, step) entry is not in the cache (never recorded, or evicted)."""


@dataclass
class _Call:
    """State of one UNet call, read by the block wrappers and processors."""

    rows: list[Row]
    edit: list[int]  # UNet row indices of edit rows
    full: list[int]  # UNet row indices of plain and record rows
    entries: dict[tuple[str, int], dict[str, torch.Tensor]]
    sinks: dict[tuple[str, int], dict[str, dict[int, torch.Tensor]]] = field(default_factory=dict)
    index: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = field(
        default_factory=dict
    )
    records: bool = False  # some row records a template
    partition: Any = False  # the windowed convolutions' row groups (`windowed_convs`); False: not yet made
    windows_off: bool = False  # this call's UNet inputs rule windows out (ControlNet residuals, FreeU)


class _SelfAttention:
    """Processor for `attn1`: the original processor unless a masked/recording plan is pending."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.pending: tuple[str, Any] | None = None

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw
    ):
        pending, self.pending = self.pending, None
        if pending is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw
            )
        kind, arg = pending
        if kind == "record":  # full compute, plus this block's keys/values for the recorded rows
            rows, store = arg
            sel = hidden_states[rows]
            store(attn.to_k(sel), attn.to_v(sel))
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw
            )
        # kind == "edit": hidden_states holds only the masked tokens (b, M, C), padded.
        scatter_idx, k_base, v_base, n_tokens = arg
        b, m, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        inner = query.shape[-1]
        idx = scatter_idx[..., None].expand(b, m, inner)
        key = k_base.scatter_(1, idx, attn.to_k(hidden_states))[:, :n_tokens]
        value = v_base.scatter_(1, idx, attn.to_v(hidden_states))[:, :n_tokens]
        head = inner // attn.heads
        query = query.view(b, -1, attn.heads, head).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, inner).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _pointwise(module: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a 1×1 convolution or a linear layer to (b, M, C) tokens."""
    if isinstance(module, torch.nn.Conv2d):
        w = module.weight.reshape(module.out_channels, -1)
        return F.linear(tokens, w, module.bias)
    return module(tokens)


def _check_supported(name: str, mod: Any) -> None:
    if not getattr(mod, "is_input_continuous", False):
        raise NotImplementedError(f"{name}: only continuous-input Transformer2DModel is supported")
    pc = getattr(mod, "proj_in", None)
    if isinstance(pc, torch.nn.Conv2d) and pc.kernel_size != (1, 1):
        raise NotImplementedError(f"{name}: proj_in must be 1x1")
    for j, blk in enumerate(mod.transformer_blocks):
        a = blk.attn1
        ok = (
            blk.norm_type == "layer_norm"
            and blk.pos_embed is None
            and not blk.only_cross_attention
            and a.group_norm is None
            and a.spatial_norm is None
            and a.norm_q is None
            and a.norm_k is None
            and not a.residual_connection
            and a.rescale_output_factor == 1.0
        )
        if not ok:
            raise NotImplementedError(f"{name}.transformer_blocks.{j}: unsupported block variant")


class MaskedUNet:
    """Installs masked/recording compute into a `UNet2DConditionModel`; call it like the UNet plus `rows`."""

    def __init__(
        self, unet: Any, cache: TemplateCache, store_dtype: torch.dtype | None = None,
        conv_halo: int | None = None,
    ) -> None:
        """`conv_halo`: compute the latent-resolution convolution blocks of an edit only in its mask's
        bounding box grown by this many cells (`windowed_convs`; None: in full, as before)."""
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        if getattr(unet, "_stepfleet_masked", None) is not None:
            raise RuntimeError(
                "a MaskedUNet is already installed on this UNet; uninstall() it first"
            )
        self.unet = unet
        self.cache = cache
        self.store_dtype = store_dtype
        self._call: _Call | None = None
        self._installed: list[tuple[Any, list[tuple[Any, _SelfAttention]]]] = []
        mods = [(n, m) for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
        for name, mod in mods:
            _check_supported(name, mod)
        for name, mod in mods:
            procs = []
            for blk in mod.transformer_blocks:
                proc = _SelfAttention(blk.attn1.processor)
                blk.attn1.set_processor(proc)
                procs.append((blk.attn1, proc))
            original = mod.forward
            mod.forward = types.MethodType(
                self._make_forward(name, original, [p for _, p in procs]), mod
            )
            self._installed.append((mod, procs))
        self.block_names = [n for n, _ in mods]
        unet._stepfleet_masked = self
        self.windows: WindowedConvs | None = None
        if conv_halo is not None:
            windows = WindowedConvs(self, conv_halo)
            self.windows = windows if windows.supported else None

    def uninstall(self) -> None:
        for mod, procs in self._installed:
            del mod.forward  # back to the class's forward
            for attn, proc in procs:
                attn.set_processor(proc.original)
        self._installed.clear()
        if self.windows is not None:
            self.windows.uninstall()
            self.windows = None
        self.unet._stepfleet_masked = None

    # -- the per-call entry points --------------------------------------------------------
    def fetch(self, rows: Sequence[Row]) -> tuple[Entries, set[tuple[str, int]]]:
        """The cached entries the edit rows need, and the (template, step) keys that are gone.

        The entries are held by reference from here on, so a concurrent eviction cannot take
        them away between this check and the call that uses them.
        """
        return fetch_entries(self.cache, rows)

    @contextmanager
    def active(self, rows: Sequence[Row], entries: Entries | None = None) -> Iterator[None]:
        """Make the next UNet call(s) inside this block run `rows` (one plan per row of the batch).

        On leaving, recorded rows are stored in the cache and the next step of every edited
        template is prefetched.
        """
        rows = list(rows)
        if entries is None:
            entries, missing = self.fetch(rows)
            if missing:
                raise TemplateMissingError(sorted(missing)[0])
        if all(r is None for r in rows):
            yield
            return
        call = _Call(
            rows=rows,
            edit=[i for i, r in enumerate(rows) if isinstance(r, EditRow)],
            full=[i for i, r in enumerate(rows) if not isinstance(r, EditRow)],
            entries=entries,
            records=any(isinstance(r, RecordRow) for r in rows),
        )
        self._call = call
        try:
            yield
        finally:
            self._call = None
        for (tid, step), named in call.sinks.items():
            tensors = {}
            for name, by_row in named.items():
                if sorted(by_row) != list(range(len(by_row))):
                    raise ValueError(f"recorded rows of {tid!r} step {step} must be 0..R-1, got {sorted(by_row)}")
                tensors[name] = torch.stack([by_row[i] for i in range(len(by_row))])
            self.cache.put(tid, step, tensors)
        for tid, step in entries:
            self.cache.prefetch(tid, step + 1)

    @torch.inference_mode()
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        rows: Sequence[Row] | None = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """One UNet call; returns the noise prediction. `rows` aligns with `sample`'s batch (None: all full)."""
        if rows is not None and len(rows) != sample.shape[0]:
            raise ValueError(f"{len(rows)} row plans for a batch of {sample.shape[0]}")
        with self.active(rows if rows is not None else [None] * sample.shape[0]):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                             **unet_kwargs)[0]

    # -- the Transformer2DModel wrapper ---------------------------------------------------
    def _make_forward(self, name: str, original: Any, procs: list[_SelfAttention]):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        owner = self

        def forward(
            mod,
            hidden_states,
            encoder_hidden_states=None,
            timestep=None,
            added_cond_kwargs=None,
            class_labels=None,
            cross_attention_kwargs=None,
            attention_mask=None,
            encoder_attention_mask=None,
            return_dict=True,
        ):
            call = owner._call
            kwargs = dict(
                timestep=timestep,
                added_cond_kwargs=added_cond_kwargs,
                class_labels=class_labels,
                cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
            )
            if call is None:
                return original(
                    hidden_states, encoder_hidden_states, return_dict=return_dict, **kwargs
                )
            if attention_mask is not None or encoder_attention_mask is not None:
                raise NotImplementedError("attention masks are not supported with masked compute")
            x, ehs = hidden_states, encoder_hidden_states
            if not call.edit:
                out = owner._full(
                    mod, name, procs, call, x, ehs, cross_attention_kwargs, original, kwargs
                )
            elif not call.full:
                out = owner._edit(mod, name, procs, call, x, ehs, cross_attention_kwargs)
            else:
                out = torch.empty_like(x)
                fi, ei = torch.tensor(call.full), torch.tensor(call.edit)
                out[fi] = owner._full(
                    mod,
                    name,
                    procs,
                    call,
                    x[fi],
                    ehs[fi],
                    cross_attention_kwargs,
                    original,
                    kwargs,
                    rows=call.full,
                )
                out[ei] = owner._edit(
                    mod, name, procs, call, x[ei], ehs[ei], cross_attention_kwargs
                )
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)

        return forward

    def _full(self, mod, name, procs, call, x, ehs, ckw, original, kwargs, rows=None):
        """Full compute for plain and record rows; records contribution and keys/values when asked."""
        rows = call.full if rows is None else rows
        rec = [(g, call.rows[i]) for g, i in enumerate(rows) if isinstance(call.rows[i], RecordRow)]
        if not rec:
            return original(x, ehs, return_dict=False, **kwargs)[0]
        b, _, h, w = x.shape
        sel = [g for g, _ in rec]

        def sink(key: str, r: RecordRow, t: torch.Tensor) -> None:
            self._sink(call, key, r, t)

        tokens, inner = mod._operate_on_continuous_inputs(x)
        for j, blk in enumerate(mod.transformer_blocks):

            def store(k, v, j=j):
                for n, (_, r) in enumerate(rec):
                    sink(f"{name}.{j}.k", r, k[n])
                    sink(f"{name}.{j}.v", r, v[n])

            procs[j].pending = ("record", (sel, store))
            tokens = blk(tokens, encoder_hidden_states=ehs, cross_attention_kwargs=ckw)
            procs[j].pending = None
        contrib = mod._get_output_for_continuous_inputs(tokens, torch.zeros_like(x), b, h, w, inner)
        for g, r in rec:
            sink(f"{name}.c", r, contrib[g].flatten(1).transpose(0, 1))
        return contrib + x

    def _sink(self, call: _Call, key: str, r: RecordRow, t: torch.Tensor, keep_dtype: bool = False) -> None:
        """Keep `t` as row `r.cache_row` of `key` in the entry the call stores for `r`'s (template, step)."""
        dtype = None if keep_dtype else self.store_dtype
        t = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        call.sinks.setdefault((r.template_id, r.step), {}).setdefault(key, {})[r.cache_row] = t

    def _indices(
        self, call: _Call, h: int, w: int, device
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(gather, scatter, M) for the edit rows at h×w: padded with token 0 / the trash row h*w."""
        got = call.index.get((h, w))
        if got is None:
            per = [call.rows[i].masks.indices(h, w) for i in call.edit]
            m = max(int(p.numel()) for p in per)
            n = h * w
            gather = torch.zeros(len(per), m, dtype=torch.long)
            scatter = torch.full((len(per), m), n, dtype=torch.long)
            for k, p in enumerate(per):
                gather[k, : p.numel()] = p
                scatter[k, : p.numel()] = p
            got = call.index[(h, w)] = (gather.to(device), scatter.to(device), m)
        return got

    def _base(self, call: _Call, key: str, like: torch.Tensor) -> torch.Tensor:
        """The cached tensor `key` for every edit row, stacked, plus one trash row: (b, N+1, D), writable."""
        base = None
        for k, i in enumerate(call.edit):
            r = call.rows[i]
            src = call.entries[(r.template_id, r.step)][key][r.cache_row]
            if base is None:
                base = like.new_empty(len(call.edit), src.shape[0] + 1, src.shape[1])
                base[:, -1] = 0
            base[k, :-1].copy_(src, non_blocking=True)
        return base

    def _edit(self, mod, name, procs, call, x, ehs, ckw):
        b, c, h, w = x.shape
        n = h * w
        gather, scatter, m = self._indices(call, h, w, x.device)
        base_c = self._base(call, f"{name}.c", x)
        if m > 0:
            normed = (
                mod.norm(x).flatten(2).transpose(1, 2)
            )  # GroupNorm over all tokens, then (b, N, C)
            tokens = torch.gather(normed, 1, gather[..., None].expand(b, m, c))
            tokens = _pointwise(mod.proj_in, tokens)
            for j, blk in enumerate(mod.transformer_blocks):
                k_base = self._base(call, f"{name}.{j}.k", x)
                v_base = self._base(call, f"{name}.{j}.v", x)
                procs[j].pending = ("edit", (scatter, k_base, v_base, n))
                tokens = blk(tokens, encoder_hidden_states=ehs, cross_attention_kwargs=ckw)
                procs[j].pending = None
            out = _pointwise(mod.proj_out, tokens)
            base_c.scatter_(1, scatter[..., None].expand(b, m, out.shape[-1]), out)
        contrib = base_c[:, :n].transpose(1, 2).reshape(b, -1, h, w)
        return contrib + x
