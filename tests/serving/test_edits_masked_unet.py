"""Masked UNet compute: record is full compute, an all-edit mask equals full compute, batches equal solo runs."""

from __future__ import annotations

import pytest
import torch

from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.masked_unet import (
    EditRow,
    MaskedUNet,
    RecordRow,
    TemplateMissingError,
    expand_rows,
)
from stepfleet.serving.edits.masks import TokenMasks

LAT = 32  # 256×256 images


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def mu(tiny_model):
    cache = TemplateCache(max_bytes=256 << 20)
    m = MaskedUNet(tiny_model.pipeline.unet, cache)
    yield m
    m.uninstall()
    cache.close()


def inputs(seed: int, rows: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, LAT, LAT, generator=g).expand(rows, -1, -1, -1).contiguous()
    e = torch.randn(rows, 77, 32, generator=g)
    return x, e


def box_mask(y0: int, y1: int, x0: int, x1: int, halo: int = 1) -> TokenMasks:
    lat = torch.zeros(LAT, LAT, dtype=torch.bool)
    lat[y0:y1, x0:x1] = True
    return TokenMasks.from_latent(lat, halo=halo)


def full(unet, x, t, e):
    with torch.inference_mode():
        return unet(x, t, encoder_hidden_states=e, return_dict=False)[0]


def test_plain_and_record_rows_are_exactly_full_compute(mu, tiny_model):
    unet = tiny_model.pipeline.unet
    x, e = inputs(0)
    t = torch.tensor([700.0, 700.0])
    ref = full(unet, x, t, e)
    assert torch.equal(mu(x, t, e, rows=None), ref)
    assert torch.equal(mu(x, t, e, rows=expand_rows(RecordRow("rec", 0), 1, cfg=True)), ref)
    entry = mu.cache.get("rec", 0)
    assert entry is not None and len(entry) == 3 * len(
        mu.block_names
    )  # contribution, k, v per block
    assert all(v.shape[0] == 2 for v in entry.values())  # uncond and cond rows
    assert mu.block_names and all(name.endswith(".c") or ".0." in name for name in entry)


def test_all_edit_mask_equals_full_compute(mu, tiny_model):
    unet = tiny_model.pipeline.unet
    x, e = inputs(1)
    t = torch.tensor([500.0, 500.0])
    mu(x, t, e, rows=expand_rows(RecordRow("all", 3), 1, cfg=True))
    x2, e2 = inputs(2)  # a different edit: nothing cached may leak in when everything is masked
    got = mu(x2, t, e2, rows=expand_rows(EditRow("all", 3, TokenMasks.full(LAT, LAT)), 1, cfg=True))
    assert rel(got, full(unet, x2, t, e2)) <= 1e-4


def test_partial_mask_on_the_templates_own_inputs_equals_full_compute(mu, tiny_model):
    """Cached keys/values and contributions are exactly what full compute would use outside the mask."""
    unet = tiny_model.pipeline.unet
    x, e = inputs(3)
    t = torch.tensor([300.0, 300.0])
    ref = mu(x, t, e, rows=expand_rows(RecordRow("same", 0), 1, cfg=True))
    got = mu(
        x, t, e, rows=expand_rows(EditRow("same", 0, box_mask(4, 10, 6, 20, halo=0)), 1, cfg=True)
    )
    assert rel(got, ref) <= 1e-4
    # ... while on other inputs the unmasked tokens really do come from the cache (not recomputed).
    x2, _ = inputs(4)
    approx = mu(
        x2, t, e, rows=expand_rows(EditRow("same", 0, box_mask(4, 10, 6, 20, halo=0)), 1, cfg=True)
    )
    assert rel(approx, full(unet, x2, t, e)) > 1e-3


def test_batch_of_edits_with_different_masks_and_templates_equals_each_alone(mu):
    t1, t2 = torch.tensor([900.0, 900.0]), torch.tensor([400.0, 400.0])
    (xa, ea), (xb, eb), (xp, ep) = inputs(5), inputs(6), inputs(7, rows=1)
    mu(xa, t1, ea, rows=expand_rows(RecordRow("A", 0), 1, cfg=True))
    mu(xb, t2, eb, rows=expand_rows(RecordRow("B", 2), 1, cfg=True))
    ra = expand_rows(EditRow("A", 0, box_mask(0, 4, 0, 4)), 1, cfg=True)  # small mask
    rb = expand_rows(EditRow("B", 2, box_mask(8, 30, 2, 25)), 1, cfg=True)  # large mask
    ya, yb = inputs(8), inputs(9)
    alone_a = mu(ya[0], t1, ya[1], rows=ra)
    alone_b = mu(yb[0], t2, yb[1], rows=rb)
    tp = torch.tensor([600.0])
    alone_p = mu(xp, tp, ep, rows=[None])
    # One call: A's rows, a plain generation's row, B's rows (different templates, steps, ratios).
    x = torch.cat([ya[0], xp, yb[0]])
    e = torch.cat([ya[1], ep, yb[1]])
    t = torch.cat([t1, tp, t2])
    out = mu(x, t, e, rows=ra + [None] + rb)
    assert rel(out[:2], alone_a) <= 1e-5
    assert rel(out[2:3], alone_p) <= 1e-5
    assert rel(out[3:], alone_b) <= 1e-5


def test_no_cfg_edit_of_a_cfg_template_uses_the_conditional_row(mu):
    x, e = inputs(10)
    t = torch.tensor([250.0, 250.0])
    ref = mu(x, t, e, rows=expand_rows(RecordRow("cfg", 0), 1, cfg=True))
    rows = expand_rows(EditRow("cfg", 0, box_mask(0, 8, 0, 8)), 1, cfg=False, template_rows=2)
    assert [r.cache_row for r in rows] == [1]
    got = mu(x[1:], t[1:], e[1:], rows=rows)
    assert rel(got, ref[1:]) <= 1e-4


def test_missing_template_is_reported_and_raises(mu):
    x, e = inputs(11, rows=1)
    rows = [EditRow("nope", 0, box_mask(0, 2, 0, 2))]
    assert mu.fetch(rows) == ({}, {("nope", 0)})
    with pytest.raises(TemplateMissingError):
        mu(x, torch.tensor([10.0]), e, rows=rows)


def test_installing_twice_is_refused(mu, tiny_model):
    with pytest.raises(RuntimeError):
        MaskedUNet(tiny_model.pipeline.unet, mu.cache)


def test_edit_from_a_spilled_template_prefetches_and_matches_memory(mu, tmp_path):
    """Entries spilled to disk come back (prefetched one step ahead) and give the same result."""
    x, e = inputs(12)
    t = torch.tensor([800.0, 800.0])
    steps = range(3)
    tm = box_mask(2, 12, 2, 12)
    in_memory = mu.cache
    for s in steps:
        mu(x, t, e, rows=expand_rows(RecordRow("P", s), 1, cfg=True))
    want = [mu(x * 0.5, t, e, rows=expand_rows(EditRow("P", s, tm), 1, cfg=True)) for s in steps]
    one = sum(v.numel() * v.element_size() for v in in_memory.get("P", 0).values())
    with TemplateCache(max_bytes=one, disk_bytes=10 * one, disk_dir=tmp_path) as small:
        mu.cache = small
        try:
            for s in steps:
                mu(x, t, e, rows=expand_rows(RecordRow("P", s), 1, cfg=True))
            assert small.stats.spills == 2 and small.complete("P", 3)
            got = [
                mu(x * 0.5, t, e, rows=expand_rows(EditRow("P", s, tm), 1, cfg=True)) for s in steps
            ]
        finally:
            mu.cache = in_memory
        assert small.stats.prefetches >= 1 and small.stats.disk_loads >= 1
        assert small.bytes_memory <= one
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
