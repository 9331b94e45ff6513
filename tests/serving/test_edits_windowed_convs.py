"""Windowed latent-resolution convolutions for UNet edits (`edits.windowed_convs`).

- The pieces: a box's convolution equals the full convolution's cells; GroupNorm from summed
  statistics equals torch's.
- On the template's own inputs an edit's windowed compute equals full compute (the boxes read
  exactly what full compute would see); an all-edit mask computes in full.
- Outside its box an edit's latent-resolution map is the template's, bit for bit.
- Mixed batches (windowed edits with different boxes, a plain row, a recording) equal each alone.
- ControlNet residuals turn the windows off; SD 1.x-style UNets (attention at the latent
  resolution) are not windowed at all.
"""

from __future__ import annotations

import pytest
import torch

from stepfleet.serving.edits.cache import TemplateCache
from stepfleet.serving.edits.masked_unet import EditRow, MaskedUNet, RecordRow, expand_rows
from stepfleet.serving.edits.masks import TokenMasks
from stepfleet.serving.edits.windowed_convs import (
    PREFIX,
    Box,
    apply_affine,
    channel_sums,
    conv_over,
    mask_box,
    norm_affine,
)
from tests.serving.test_edits_masked_unet import LAT, inputs, rel

HALO = 2

@pytest.fixture(scope="module")
def mw(tiny_model):
    cache = TemplateCache(max_bytes=512 << 20)
    m = MaskedUNet(tiny_model.pipeline.unet, cache, conv_halo=HALO)
    yield m
    m.uninstall()
    cache.close()


def box_mask(y0: int, y1: int, x0: int, x1: int) -> TokenMasks:
    lat = torch.zeros(LAT, LAT, dtype=torch.bool)
    lat[y0:y1, x0:x1] = True
    return TokenMasks.from_latent(lat, halo=1)


def painted(x: torch.Tensor, seed: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """The template's latents with other values inside the mask, as an edit's are."""
    other, _ = inputs(seed, rows=x.shape[0])
    out = x.clone()
    out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return out


# -- the pieces -------------------------------------------------------------------------------------

def test_a_box_of_a_convolution_equals_those_cells_of_the_full_one():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 12, 10)
    full = conv(x)
    for out in (Box(0, 4, 0, 3), Box(5, 12, 7, 10), Box(3, 6, 2, 8), Box(0, 12, 0, 10)):
        inp = out.grow(1).clip(12, 10)
        got = conv_over(conv, inp.of(x), inp, out, 12, 10)
        assert torch.allclose(got, out.of(full), atol=1e-6)


def test_group_norm_from_summed_statistics_equals_torchs():
    torch.manual_seed(1)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(3, 8, 9, 7) * 3 + 1
    got = apply_affine(x, *norm_affine(norm, channel_sums(x), 9 * 7))
    assert torch.allclose(got, norm(x), atol=1e-5)


def test_the_box_is_the_masks_bounding_box_grown_and_clipped():
    m = torch.zeros(16, 16, dtype=torch.bool)
    m[3:5, 10:15] = True
    m[6, 12] = True
    assert mask_box(m, 2) == Box(1, 9, 8, 16)
    assert mask_box(torch.zeros(4, 4, dtype=torch.bool), 2).area == 0


# -- exactness on the UNet --------------------------------------------------------------------------

def test_tiny_sd_is_windowed_and_recordings_store_the_maps(mw, tiny_model):
    assert mw.windows is not None
    x, e = inputs(0)
    t = torch.tensor([700.0, 700.0])
    with torch.inference_mode():
        ref = tiny_model.pipeline.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    assert torch.equal(mw(x, t, e, rows=expand_rows(RecordRow("rec", 0), 1, cfg=True)), ref)  # recording is full
    entry = mw.cache.get("rec", 0)
    maps = {k for k in entry if k.startswith(PREFIX)}
    # 2 + 3 ResNet blocks (output and pre-norm2 map, each with its sums), the down- and upsampler.
    assert len(maps) == 5 * 4 + 1 + 2
    assert entry[PREFIX + "down_blocks.0.resnets.0.out"].shape == (2, 32, LAT, LAT)
    assert entry[PREFIX + "down_blocks.0.resnets.0.out.s"].dtype == torch.float64


def test_on_the_templates_own_inputs_windows_equal_full_compute(mw):
    x, e = inputs(1)
    t = torch.tensor([500.0, 500.0])
    ref = mw(x, t, e, rows=expand_rows(RecordRow("own", 1), 1, cfg=True))
    for box in ((4, 12, 6, 14), (0, 6, 26, 32), (20, 32, 0, 9)):  # inside, and at the map's corners
        got = mw(x, t, e, rows=expand_rows(EditRow("own", 1, box_mask(*box)), 1, cfg=True))
        assert rel(got, ref) <= 1e-4, box


def test_outside_its_box_the_latent_resolution_map_is_the_templates(mw, tiny_model):
    unet = tiny_model.pipeline.unet
    x, e = inputs(2)
    t = torch.tensor([400.0, 400.0])
    mw(x, t, e, rows=expand_rows(RecordRow("out", 0), 1, cfg=True))
    template = mw.cache.get("out", 0)[PREFIX + "up_blocks.1.resnets.2.out"]
    seen = []
    hook = unet.conv_norm_out.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        mw(painted(x, 9, 8, 14, 8, 14), t, e, rows=expand_rows(EditRow("out", 0, box_mask(8, 14, 8, 14)), 1, cfg=True))
    finally:
        hook.remove()
    final = seen[0]
    inside = torch.zeros(LAT, LAT, dtype=torch.bool)
    inside[8 - HALO:14 + HALO, 8 - HALO:14 + HALO] = True
    assert torch.equal(final[..., ~inside], template[..., ~inside])
    assert not torch.allclose(final[..., inside], template[..., inside])  # the edit's own values inside


def test_an_all_edit_mask_computes_in_full(mw, tiny_model):
    x, e = inputs(3)
    t = torch.tensor([300.0, 300.0])
    mw(x, t, e, rows=expand_rows(RecordRow("all", 0), 1, cfg=True))
    x2, e2 = inputs(4)
    got = mw(x2, t, e2, rows=expand_rows(EditRow("all", 0, TokenMasks.full(LAT, LAT)), 1, cfg=True))
    with torch.inference_mode():
        ref = tiny_model.pipeline.unet(x2, t, encoder_hidden_states=e2, return_dict=False)[0]
    assert rel(got, ref) <= 1e-4


def test_a_mixed_batch_equals_each_row_alone(mw):
    t1, t2, tp = torch.tensor([900.0, 900.0]), torch.tensor([200.0, 200.0]), torch.tensor([600.0])
    (xa, ea), (xb, eb), (xp, ep), (xr, er) = inputs(5), inputs(6), inputs(7, rows=1), inputs(8)
    mw(xa, t1, ea, rows=expand_rows(RecordRow("A", 0), 1, cfg=True))
    mw(xb, t2, eb, rows=expand_rows(RecordRow("B", 2), 1, cfg=True))
    ra = expand_rows(EditRow("A", 0, box_mask(0, 5, 0, 5)), 1, cfg=True)
    rb = expand_rows(EditRow("B", 2, box_mask(10, 22, 12, 30)), 1, cfg=True)
    rr = expand_rows(RecordRow("R", 0), 1, cfg=True)
    ya, yb = painted(xa, 10, 0, 5, 0, 5), painted(xb, 11, 10, 22, 12, 30)
    alone = [mw(ya, t1, ea, rows=ra), mw(xp, tp, ep, rows=[None]), mw(yb, t2, eb, rows=rb)]
    alone.append(mw(xr, t1, er, rows=rr))
    recorded = {k: v.clone() for k, v in mw.cache.get("R", 0).items()}
    out = mw(torch.cat([ya, xp, yb, xr]), torch.cat([t1, tp, t2, t1]), torch.cat([ea, ep, eb, er]),
             rows=ra + [None] + rb + rr)
    for got, want in zip(torch.split(out, [2, 1, 2, 2]), alone, strict=True):
        assert rel(got, want) <= 1e-5
    again = mw.cache.get("R", 0)
    assert all(rel(again[k].double(), v.double()) <= 1e-5 for k, v in recorded.items() if v.abs().max() > 0)


def test_controlnet_residuals_turn_the_windows_off(mw, monkeypatch):
    x, e = inputs(12)
    t = torch.tensor([800.0, 800.0])
    mw(x, t, e, rows=expand_rows(RecordRow("cn", 0), 1, cfg=True))
    rows = expand_rows(EditRow("cn", 0, box_mask(4, 10, 4, 10)), 1, cfg=True)
    calls = []
    monkeypatch.setattr(mw.windows, "_resnet", lambda *a, **k: calls.append(1) or pytest.fail("windowed"))
    unet = mw.unet
    down = [torch.zeros(2, c, s, s) for c, s in ((32, LAT), (32, LAT), (32, LAT), (32, LAT // 2), (64, LAT // 2),
                                                  (64, LAT // 2))]
    with mw.active(rows), torch.inference_mode():
        unet(x, t, encoder_hidden_states=e, down_block_additional_residuals=down,
             mid_block_additional_residual=torch.zeros(2, 64, LAT // 2, LAT // 2), return_dict=False)
    assert not calls


def test_sd1_style_unets_are_not_windowed():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    cache = TemplateCache(max_bytes=1 << 20)
    m = MaskedUNet(unet, cache, conv_halo=HALO)
    try:
        assert m.windows is None
        x = torch.randn(1, 4, 16, 16)
        e = torch.randn(1, 77, 32)
        with torch.inference_mode():
            ref = unet(x, torch.tensor([10.0]), encoder_hidden_states=e, return_dict=False)[0]
        assert torch.equal(m(x, torch.tensor([10.0]), e, rows=[RecordRow("s", 0)]), ref)
        assert not any(k.startswith(PREFIX) for k in cache.get("s", 0))
    finally:
        m.uninstall()
        cache.close()


def test_uninstall_restores_the_unet(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_model.pipeline.unet.config).eval()  # `mw` holds the shared one
    x, e = inputs(13)
    t = torch.tensor([100.0, 100.0])
    cache = TemplateCache(max_bytes=64 << 20)
    with torch.inference_mode():
        before = unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    m = MaskedUNet(unet, cache, conv_halo=HALO)
    m.uninstall()
    cache.close()
    assert "forward" not in vars(unet.down_blocks[0]) and "forward" not in vars(unet.up_blocks[-1])
    assert not unet._forward_pre_hooks and not unet.down_blocks[0].resnets[0]._forward_hooks
    with torch.inference_mode():
        assert torch.equal(unet(x, t, encoder_hidden_states=e, return_dict=False)[0], before)


def test_a_resnet_box_equals_the_block_run_on_the_composite_map(mw):
    """Inside the box a ResNet block sees exactly the composite: the edit's values there, the template's
    elsewhere, GroupNorm statistics of that map (the template's own values inside the box are
    subtracted out: here they are garbage)."""
    from stepfleet.serving.edits.windowed_convs import Group, Partition, Patched, TemplateMaps

    res = mw.unet.down_blocks[0].resnets[1]
    torch.manual_seed(3)
    c, box = res.conv1.in_channels, Box(5, 13, 9, 20)
    temb = torch.randn(1, res.time_emb_proj.in_features)
    composite = torch.randn(1, c, LAT, LAT)
    with torch.inference_mode():
        want = box.of(res(composite, temb))
        h1 = []
        hook = res.norm2.register_forward_pre_hook(lambda mod, args: h1.append(args[0].clone()))
        res(composite, temb)
        hook.remove()
        t_in, t_h1 = composite.clone(), h1[0].clone()
        box.of(t_in).normal_(5.0, 3.0)  # the template's values inside the box: never read, only subtracted
        box.of(t_h1).normal_(-4.0, 2.0)
        h1_key = PREFIX + mw.windows.names[res] + ".h1"
        entry = {"in": t_in, "in.s": channel_sums(t_in), h1_key: t_h1, h1_key + ".s": channel_sums(t_h1)}
        part = Partition(1, (), (Group((0,), box, ((entry, 0),)),))
        x = Patched(part, None, [box.of(composite).clone()], TemplateMaps(part, "in", composite), composite.shape)
        got = mw.windows._resnet(res, [x], temb, part).crops[0]
    assert rel(got, want) <= 1e-5
