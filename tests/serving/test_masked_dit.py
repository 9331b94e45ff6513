"""Masked compute on the DiT families (`edits.masked_dit`): record a template's attention, edit masked tokens.

For SD3 and Flux, through the backbone's own `denoise` (so Flux's packing and image ids are
the real ones):
- a recording is full compute (and stores every attention's image keys/values);
- an edit with a partial mask on the template's own inputs equals full compute (the cached
  keys/values are exactly what full compute makes);
- an edit with an all-edit mask on other inputs equals full compute on those inputs;
- a partial mask on other inputs changes only what it computes: outside the mask the output is
  the template's, inside it is not;
- rows of plain requests, recordings and edits mix in one call.
"""

from __future__ import annotations

import pytest
import torch

from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.masked_unet import EditRow, RecordRow, expand_rows
from stepfleet.serving.edits.masks import TokenMasks
from stepfleet.serving.params import GenerationParams

LAT = 16  # 128x128 images: an 8x8 token grid
TOL = 1e-4


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def dit(request):
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.edits.masked_dit import MaskedDiT
    from stepfleet.serving.loading import load_model

    backbone = load_backbone(load_model(request.param, device="cpu"))
    cache = TemplateCache(max_bytes=64 << 20)
    masked = MaskedDiT(backbone.denoiser, cache)
    yield backbone, masked
    masked.uninstall()
    cache.close()


def inputs(backbone, seed: int, prompt: str):
    """(sample, timestep, conditioning) of one guided (SD3) or plain (Flux) image: its rows."""
    g = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompt(GenerationParams(prompt=prompt, width=128, height=128, guidance_scale=4.0),
                                  guidance=backbone.capabilities.guidance)
    rows = [cond.negative, cond.positive] if cond.negative is not None else [cond.positive]
    c = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    x = torch.randn(1, 16, LAT, LAT, generator=g).expand(len(rows), -1, -1, -1).contiguous()
    return x, torch.full((len(rows),), 700.0), c


def denoise(backbone, masked, x, t, c, rows=None):
    with torch.inference_mode():
        if rows is None:
            return backbone.denoise(x, t, c)
        with masked.active(rows):
            return backbone.denoise(x, t, c)


def box(y0=4, x0=2, side=6) -> torch.Tensor:
    m = torch.zeros(LAT, LAT, dtype=torch.bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_record_then_edit_equals_full_compute(dit):
    backbone, masked = dit
    cfg = backbone.capabilities.guidance
    x, t, c = inputs(backbone, 1, "a template")
    full = denoise(backbone, masked, x, t, c)
    rec = denoise(backbone, masked, x, t, c, expand_rows(RecordRow("tpl", 0), 1, cfg))
    assert rel(rec, full) <= 1e-6
    entry = masked.cache.get("tpl", 0)
    assert entry is not None and "out" in entry and any(k.endswith(".attn.k") for k in entry)
    assert next(v for k, v in entry.items() if k.endswith(".attn.k")).shape[0] == (2 if cfg else 1)
    # The template's own inputs, a partial mask (halo 1): every token reads exactly full compute's keys.
    part = TokenMasks.from_latent(box(), halo=1)
    assert 0 < part.ratio(LAT // 2, LAT // 2) < 1
    edit = denoise(backbone, masked, x, t, c, expand_rows(EditRow("tpl", 0, part), 1, cfg, 2 if cfg else 1))
    assert rel(edit, full) <= TOL
    # Other inputs, everything edited: nothing cached is read, so it is full compute.
    x2, t2, c2 = inputs(backbone, 2, "another prompt")
    every = denoise(backbone, masked, x2, t2, c2, expand_rows(EditRow("tpl", 0, TokenMasks.full(LAT, LAT)), 1, cfg, 2 if cfg else 1))
    assert rel(every, denoise(backbone, masked, x2, t2, c2)) <= TOL
    # Other inputs, a partial mask: outside the edited tokens the template's output, inside a new one.
    edited = denoise(backbone, masked, x2, t2, c2, expand_rows(EditRow("tpl", 0, part), 1, cfg, 2 if cfg else 1))
    inside = part.mask(LAT // 2, LAT // 2).reshape(LAT // 2, LAT // 2)
    inside = inside.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(edited[..., ~inside], full[..., ~inside])
    assert rel(edited[..., inside], full[..., inside]) > 1e-3


def test_plain_record_and_edit_rows_mix_in_one_call(dit):
    backbone, masked = dit
    cfg = backbone.capabilities.guidance
    xa, ta, ca = inputs(backbone, 3, "template b")
    denoise(backbone, masked, xa, ta, ca, expand_rows(RecordRow("b", 1), 1, cfg))
    xb, tb, cb = inputs(backbone, 4, "a plain request")
    xc, tc, cc = inputs(backbone, 5, "a new recording")
    part = TokenMasks.from_latent(box(2, 8, 4), halo=1)
    rows = (expand_rows(EditRow("b", 1, part), 1, cfg, 2 if cfg else 1) + expand_rows(None, 1, cfg)
            + expand_rows(RecordRow("c", 1), 1, cfg))
    x, t = torch.cat([xa, xb, xc]), torch.cat([ta, tb, tc])
    c = {k: torch.cat([ca[k], cb[k], cc[k]]) for k in ca}
    mixed = denoise(backbone, masked, x, t, c, rows)
    k = xa.shape[0]
    assert rel(mixed[:k], denoise(backbone, masked, xa, ta, ca)) <= TOL  # the template's own inputs
    assert rel(mixed[k : 2 * k], denoise(backbone, masked, xb, tb, cb)) <= TOL
    assert rel(mixed[2 * k :], denoise(backbone, masked, xc, tc, cc)) <= TOL
    assert masked.cache.get("c", 1) is not None


def test_uninstall_restores_the_transformer(dit):
    from stepfleet.serving.edits.masked_dit import MaskedDiT

    backbone, masked = dit
    with pytest.raises(RuntimeError):
        MaskedDiT(backbone.denoiser, masked.cache)
    x, t, c = inputs(backbone, 6, "x")
    before = denoise(backbone, masked, x, t, c)
    masked.uninstall()
    try:
        assert "forward" not in vars(backbone.denoiser)
        assert torch.equal(denoise(backbone, masked, x, t, c), before)
    finally:
        masked.__init__(backbone.denoiser, masked.cache)  # reinstalled for the module's other tests


def test_sd35_dual_attention_blocks_take_masked_compute():
    """SD3.5's blocks add an image-only self-attention (`attn2`): its keys/values are cached too."""
    from diffusers import SD3Transformer2DModel

    from stepfleet.serving.edits.masked_dit import MaskedDiT

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=32,
                                        qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    g = torch.Generator().manual_seed(1)
    x, text, pooled = torch.randn(1, 16, LAT, LAT, generator=g), torch.randn(1, 7, 32, generator=g), torch.randn(1, 16, generator=g)
    t = torch.tensor([500.0])

    def call(x, text, rows=None):
        with torch.inference_mode():
            if rows is None:
                return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                                   return_dict=False)[0]
            with masked.active(rows):
                return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                   pooled_projections=pooled, return_dict=False)[0]

    cache = TemplateCache(max_bytes=16 << 20)
    masked = MaskedDiT(transformer, cache)
    try:
        full = call(x, text)
        assert rel(call(x, text, [RecordRow("t", 0)]), full) <= 1e-6
        assert "transformer_blocks.0.attn2.k" in cache.get("t", 0)
        part = TokenMasks.from_latent(box(), halo=0)
        assert rel(call(x, text, [EditRow("t", 0, part)]), full) <= TOL
        x2, text2 = torch.randn(1, 16, LAT, LAT, generator=g), torch.randn(1, 7, 32, generator=g)
        assert rel(call(x2, text2, [EditRow("t", 0, TokenMasks.full(LAT, LAT))]), call(x2, text2)) <= TOL
    finally:
        masked.uninstall()
        cache.close()
