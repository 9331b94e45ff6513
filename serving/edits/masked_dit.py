"""Masked compute for the DiT families (SD3's MMDiT, Flux): record a template, then edit only masked tokens.

Why a DiT pays more than a UNet. In a DiT every layer after the patch embedding is attention
or a per-token MLP over tokens; there are no convolutions that must run over the whole latent.
Everything in a block is per token except attention, where every query reads every key. So an
edit computes only the masked image tokens (with a halo) and all text tokens, and the image
tokens it does not compute are present in attention only through their keys and values, which
it reads from the template's recording of the same step.

RECORD (full compute, as diffusers runs it) stores per (template, step), for each recorded row:
every attention's image-token keys and values — after the q/k norms, and for Flux after the
rotary embedding, exactly as attention consumes them — and the transformer's output tokens
(`out`, the noise prediction before unpatchifying).

EDIT runs the transformer on the gathered masked tokens: the patch embedding (SD3:
`pos_embed`, positional embedding included; Flux: `x_embedder`, with the image ids gathered so
the rotary embedding is the tokens' own) is followed by a gather, so every block, norm and MLP
sees only M of the N image tokens; in each attention the M computed keys/values are written
over a copy of the template's N cached ones ("masked rows refreshed") and the text tokens'
are appended, so queries attend to every token; the output projection's M tokens are written
into the template's cached output, which `unpatchify` (SD3) or the runner (Flux) then sees
whole. Outside the mask the runner keeps the template's latents anyway (`EditExtension`);
the cached output there only keeps the model's prediction plausible for previews.

Exactness, tested: with a mask covering every token nothing cached is read and the result is
full compute up to float rounding; on the template's own inputs any mask gives full compute's
result (the cached keys/values are then exactly what full compute would produce).

Batching. Rows of one call may be plain, recordings or edits. Plain and recording rows run as
one sub-call; edit rows are grouped by their token mask (one sub-call each: Flux's rotary
embedding is shared by a call's rows, so a call's rows must share their token positions).
The runner's one denoiser call per step thus becomes 1 + (distinct edit masks) transformer
calls. The interface is `MaskedUNet`'s (`fetch`, `active`, rows from `expand_rows`), so the
edits extension uses either without knowing which.

Not thread-safe: one transformer call at a time (the step loop). ControlNet residuals, skip
layers and IP-adapters are not supported on masked calls (they raise).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.masked_unet import (
    EditRow,
    Entries,
    RecordRow,
    Row,
    TemplateMissingError,
    fetch_entries,
)

#: Per family: the transformer's arguments with one row per batch row (split per sub-call).
ROW_ARGS: dict[str, tuple[str, ...]] = {
    "sd3": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    "flux": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
}


@dataclass
class _Mode:
    """What the current sub-call does: record some rows, or edit all rows on `index` tokens."""

    #: Row (in this sub-call) → the recording it stores into; empty for an edit.
    records: dict[int, RecordRow] = field(default_factory=dict)
    #: The edited image tokens (sorted indices into the N tokens); None when not an edit.
    index: torch.Tensor | None = None
    #: For an edit: each row's cached entry and row in it.
    sources: list[tuple[dict[str, torch.Tensor], int]] = field(default_factory=list)
    #: Image tokens in this sub-call's sequence (N, or M for an edit).
    n_image: int = 0
    sinks: dict[tuple[str, int], dict[str, dict[int, torch.Tensor]]] | None = None
    store_dtype: torch.dtype | None = None

    def store(self, name: str, tensor: torch.Tensor) -> None:
        """Keep rows of `tensor` (batch-first) for the recordings of this sub-call."""
        assert self.sinks is not None
        for row, rec in self.records.items():
            t = tensor[row].detach().to(device="cpu", dtype=self.store_dtype or tensor.dtype).contiguous()
            self.sinks.setdefault((rec.template_id, rec.step), {}).setdefault(name, {})[rec.cache_row] = t

    def cached(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The cached tensor `name` of every edit row, stacked batch-first, on `like`'s device (a copy)."""
        return torch.stack([entry[name][row] for entry, row in self.sources]).to(like.device, like.dtype)

    def image_kv(self, name: str, key: torch.Tensor, value: torch.Tensor, seq_dim: int,
                 image_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values as attention must see them: record the image part, or complete an edit's."""
        out = []
        for tag, t in (("k", key), ("v", value)):
            length = t.shape[seq_dim]
            start = 0 if image_first else length - self.n_image
            image = t.narrow(seq_dim, start, self.n_image)
            rest = t.narrow(seq_dim, self.n_image, length - self.n_image) if image_first else t.narrow(seq_dim, 0, start)
            if self.index is None:
                if self.records:
                    self.store(f"{name}.{tag}", image)
                out.append(t)
                continue
            full = self.cached(f"{name}.{tag}", t).index_copy_(seq_dim, self.index.to(t.device), image)
            out.append(torch.cat([full, rest] if image_first else [rest, full], dim=seq_dim))
        return out[0], out[1]


class _SD3Attention:
    """`JointAttnProcessor2_0`'s arithmetic, with the image keys/values through `_Mode.image_kv`."""

    def __init__(self, original: Any, owner: MaskedDiT, name: str) -> None:
        self.original, self.owner, self.name = original, owner, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        mode = self.owner._mode
        if mode is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported with masked compute")
        b, m = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq, ek, ev = (p(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([x, e], dim=2) for x, e in ((query, eq), (key, ek), (value, ev)))
        key, value = mode.image_kv(self.name, key, value, seq_dim=2, image_first=True)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :m], out[:, m:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


def _flux_projections(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of the image (or joint) tokens and of the text tokens (None in single blocks), fused
    or not, as diffusers' Flux processor projects them."""
    eq = ek = ev = None
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, eq, ek, ev
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states), \
            attn.add_v_proj(encoder_hidden_states)
    return query, key, value, eq, ek, ev


class _FluxAttention:
    """`FluxAttnProcessor`'s arithmetic, with the image keys/values through `_Mode.image_kv`."""

    def __init__(self, original: Any, owner: MaskedDiT, name: str) -> None:
        self.original, self.owner, self.name = original, owner, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mode = self.owner._mode
        if mode is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported with masked compute")
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, eq, ek, ev = _flux_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = (torch.cat([e, x], dim=1) for e, x in ((eq, query), (ek, key), (ev, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        key, value = mode.image_kv(self.name, key, value, seq_dim=1, image_first=False)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=self.original._attention_backend,
                                    parallel_config=self.original._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        context, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


def family_of(transformer: torch.nn.Module) -> str:
    """`sd3` or `flux` by the transformer's class; NotImplementedError for any other denoiser."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    raise NotImplementedError(f"masked DiT compute supports SD3 and Flux transformers, not {type(transformer).__name__}")


class MaskedDiT:
    """Installs masked/recording compute into an SD3 or Flux transformer (see the module)."""

    def __init__(self, transformer: Any, cache: TemplateCache, store_dtype: torch.dtype | None = None) -> None:
        if getattr(transformer, "_stepfleet_masked", None) is not None:
            raise RuntimeError("masked compute is already installed on this transformer; uninstall() it first")
        self.family = family_of(transformer)
        self.transformer, self.cache, self.store_dtype = transformer, cache, store_dtype
        self._mode: _Mode | None = None
        self._rows: list[Row] | None = None
        self._entries: Entries = {}
        self._sinks: dict[tuple[str, int], dict[str, dict[int, torch.Tensor]]] = {}
        self._processors: list[tuple[Any, Any]] = []
        wrap = _SD3Attention if self.family == "sd3" else _FluxAttention
        blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))
        prefixes = (["transformer_blocks"] * len(transformer.transformer_blocks)
                    + ["single_transformer_blocks"] * len(getattr(transformer, "single_transformer_blocks", [])))
        counts: dict[str, int] = {}
        for prefix, block in zip(prefixes, blocks, strict=True):
            j = counts[prefix] = counts.get(prefix, -1) + 1
            for attr in ("attn", "attn2"):
                attn = getattr(block, attr, None)
                if attn is None:
                    continue
                original = attn.processor
                attn.set_processor(wrap(original, self, f"{prefix}.{j}.{attr}"))
                self._processors.append((attn, original))
        embedder = transformer.pos_embed if self.family == "sd3" else transformer.x_embedder
        self._hooks = [embedder.register_forward_hook(self._gather_hook),
                       transformer.proj_out.register_forward_hook(self._scatter_hook)]
        self._signature = inspect.signature(transformer.forward)
        self._original_forward = transformer.forward
        transformer.forward = types.MethodType(self._make_forward(), transformer)
        transformer._stepfleet_masked = self

    def uninstall(self) -> None:
        for attn, original in self._processors:
            attn.set_processor(original)
        self._processors.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if "forward" in vars(self.transformer):
            del self.transformer.forward
        self.transformer._stepfleet_masked = None

    # -- the per-call entry points (as `MaskedUNet`) -----------------------------------------
    def fetch(self, rows: Sequence[Row]) -> tuple[Entries, set[tuple[str, int]]]:
        """The cached entries the edit rows need, and the (template, step) keys that are gone."""
        return fetch_entries(self.cache, rows)

    @contextmanager
    def active(self, rows: Sequence[Row], entries: Entries | None = None) -> Iterator[None]:
        """Make the next transformer call inside this block run `rows` (one plan per batch row);
        on leaving, store the recordings and prefetch the next step of every edited template."""
        rows = list(rows)
        if entries is None:
            entries, missing = self.fetch(rows)
            if missing:
                raise TemplateMissingError(sorted(missing)[0])
        if all(r is None for r in rows):
            yield
            return
        self._rows, self._entries, self._sinks = rows, entries, {}
        try:
            yield
        finally:
            self._rows, sinks, self._sinks = None, self._sinks, {}
        for (tid, step), named in sinks.items():
            tensors = {}
            for name, by_row in named.items():
                if sorted(by_row) != list(range(len(by_row))):
                    raise ValueError(f"recorded rows of {tid!r} step {step} must be 0..R-1, got {sorted(by_row)}")
                tensors[name] = torch.stack([by_row[i] for i in range(len(by_row))])
            self.cache.put(tid, step, tensors)
        for tid, step in entries:
            self.cache.prefetch(tid, step + 1)

    # -- the transformer wrapper -------------------------------------------------------------
    def _make_forward(self):
        owner = self

        def forward(mod, *args, **kwargs):
            rows = owner._rows
            if rows is None:
                return owner._original_forward(*args, **kwargs)
            bound = owner._signature.bind(*args, **kwargs)
            call = dict(bound.arguments)
            for unsupported in ("block_controlnet_hidden_states", "controlnet_block_samples",
                                "controlnet_single_block_samples", "skip_layers"):
                if call.get(unsupported) is not None:
                    raise NotImplementedError(f"{unsupported} is not supported with masked compute")
            if len(rows) != call["hidden_states"].shape[0]:
                raise ValueError(f"{len(rows)} row plans for a batch of {call['hidden_states'].shape[0]}")
            return_dict = call.pop("return_dict", True)
            out = owner._run(call)
            if return_dict:
                from diffusers.models.modeling_outputs import Transformer2DModelOutput

                return Transformer2DModelOutput(sample=out)
            return (out,)

        return forward

    def _groups(self, rows: list[Row]) -> list[tuple[list[int], _Mode]]:
        """Sub-calls: plain and recording rows together, then edit rows by token mask."""
        groups: list[tuple[list[int], _Mode]] = []
        full = [i for i, r in enumerate(rows) if not isinstance(r, EditRow)]
        if full:
            records = {g: r for g, i in enumerate(full) if isinstance(r := rows[i], RecordRow)}
            groups.append((full, _Mode(records=records, sinks=self._sinks, store_dtype=self.store_dtype)))
        by_mask: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if isinstance(r, EditRow):
                by_mask.setdefault(id(r.masks), []).append(i)
        for members in by_mask.values():
            plans = [rows[i] for i in members]
            sources = [(self._entries[(p.template_id, p.step)], p.cache_row) for p in plans]  # type: ignore[union-attr]
            groups.append((members, _Mode(sources=sources, index=torch.empty(0, dtype=torch.long))))
        return groups

    def _run(self, call: dict[str, Any]) -> torch.Tensor:
        assert self._rows is not None
        x = call["hidden_states"]
        h, w = self._grid(call)
        out: torch.Tensor | None = None
        for members, mode in self._groups(self._rows):
            sub = dict(call)
            sel = torch.tensor(members, device=x.device)
            for key in ROW_ARGS[self.family]:
                if sub.get(key) is not None:
                    sub[key] = sub[key].index_select(0, sel)
            if mode.index is not None:  # an edit: its token indices on the DiT's grid
                plan = self._rows[members[0]]
                assert isinstance(plan, EditRow)
                mode.index = plan.masks.indices(h, w).to(x.device)
                if self.family == "flux":
                    sub["img_ids"] = sub["img_ids"].index_select(0, mode.index)
            mode.n_image = h * w if mode.index is None else int(mode.index.numel())
            # Plain rows alone run diffusers' own processors; recordings and edits run ours.
            self._mode = mode if mode.records or mode.index is not None else None
            try:
                got = self._original_forward(**sub, return_dict=False)[0]
            finally:
                self._mode = None
            if out is None:
                out = got.new_empty((x.shape[0], *got.shape[1:]))
            out[sel] = got
        assert out is not None
        return out

    def _grid(self, call: dict[str, Any]) -> tuple[int, int]:
        """The token grid (rows, columns) of the call: SD3's patches of the latents; Flux's packed
        input does not show it, its image ids (0, row, col) do."""
        if self.family == "sd3":
            p, x = int(self.transformer.config.patch_size), call["hidden_states"]
            return int(x.shape[-2]) // p, int(x.shape[-1]) // p
        ids = call["img_ids"]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    # -- hooks on the patch embedding and the output projection --------------------------------
    def _gather_hook(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        mode = self._mode
        if mode is None or mode.index is None:
            return None
        return output.index_select(1, mode.index)

    def _scatter_hook(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        mode = self._mode
        if mode is None:
            return None
        if mode.index is None:
            if mode.records:
                mode.store("out", output)
            return None
        return mode.cached("out", output).index_copy_(1, mode.index, output)
