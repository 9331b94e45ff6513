"""Edit masks: PNG validation, latent any-covered pooling, the token pyramid with its halo, compositing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stepfleet.serving.edits.masks import (
    MaskError,
    TokenMasks,
    composite,
    dilate,
    latent_mask,
    pixel_mask_from_png,
)


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgba_mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Opaque everywhere except a transparent `box` (x0, y0, x1, y1): the edit area."""
    a = np.full((h, w, 4), 255, dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1, 3] = 0
    return Image.fromarray(a, "RGBA")


def test_transparent_pixels_are_the_edit_area():
    m = pixel_mask_from_png(png(rgba_mask(64, 32, (8, 4, 16, 12))), (64, 32))
    assert m.shape == (32, 64) and m.dtype == torch.bool
    assert m.sum() == 8 * 8 and m[4:12, 8:16].all()


@pytest.mark.parametrize(
    "data, why",
    [
        (b"not an image", "readable"),
        (png(Image.new("RGB", (64, 32))), "alpha"),
        (png(rgba_mask(32, 32, (0, 0, 1, 1))), "size"),
        (png(Image.new("RGB", (64, 32)), "JPEG"), "PNG"),
    ],
)
def test_bad_masks_raise_a_value_error_naming_mask(data, why):
    with pytest.raises(MaskError, match=why) as err:
        pixel_mask_from_png(data, (64, 32))
    assert (
        isinstance(err.value, ValueError) and err.value.param == "mask" and "mask" in str(err.value)
    )


def test_palette_png_with_transparency_is_accepted():
    img = rgba_mask(16, 16, (0, 0, 4, 4)).convert("P")
    img.info["transparency"] = 0
    assert pixel_mask_from_png(png(img), (16, 16)).shape == (16, 16)


def test_latent_mask_marks_a_cell_when_any_of_its_pixels_is_edited():
    m = torch.zeros(64, 64, dtype=torch.bool)
    m[9, 17] = True  # one pixel in latent cell (1, 2)
    lat = latent_mask(m, 8)
    assert lat.shape == (8, 8) and lat.sum() == 1 and lat[1, 2]
    with pytest.raises(MaskError):
        latent_mask(torch.zeros(60, 64, dtype=torch.bool), 8)


def test_pyramid_levels_and_halo():
    lat = torch.zeros(64, 64, dtype=torch.bool)
    lat[10:14, 20:22] = True
    tm = TokenMasks.from_latent(lat, halo=0)
    assert [k for k in tm.levels] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert tm.mask(32, 32).reshape(32, 32)[5:7, 10:11].all() and tm.mask(32, 32).sum() == 2
    assert tm.mask(8, 8).sum() == 1
    halo = TokenMasks.from_latent(lat, halo=2)
    assert halo.mask(32, 32).sum() == (2 + 4) * (1 + 4)  # a 2x1 block grown by 2 each side
    assert halo.mask(4, 4).sum() == 3 * 4  # cell (0, 1) grown by 2, clipped at the border
    # The halo only widens: every level contains the halo-free level.
    for k in tm.levels:
        assert (halo.mask(*k) | tm.mask(*k)).equal(halo.mask(*k))
    assert halo.ratio() == pytest.approx(8 / 4096)
    idx = halo.indices(32, 32)
    assert (
        idx.dtype == torch.long
        and idx.numel() == 30
        and torch.equal(idx, torch.nonzero(halo.mask(32, 32)).reshape(-1))
    )


def test_odd_sizes_pool_like_a_stride_two_convolution():
    tm = TokenMasks.from_latent(torch.ones(9, 7, dtype=torch.bool), halo=0)
    assert (5, 4) in tm.levels and (3, 2) in tm.levels


def test_dilate_and_full():
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[2, 2] = True
    assert dilate(m, 1).sum() == 9 and dilate(m, 0).equal(m)
    full = TokenMasks.full(8, 8)
    assert full.indices(4, 4).tolist() == list(range(16)) and full.ratio() == 1.0


def test_composite_keeps_template_pixels_outside_the_mask_exactly():
    rng = np.random.default_rng(0)
    t = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    e = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    m = torch.zeros(32, 48, dtype=torch.bool)
    m[5:20, 10:30] = True
    out = np.asarray(composite(e, t, m))
    assert np.array_equal(out[~m.numpy()], np.asarray(t)[~m.numpy()])
    assert np.array_equal(out[m.numpy()], np.asarray(e)[m.numpy()])
    arr = composite(np.asarray(e), np.asarray(t), m)
    assert isinstance(arr, np.ndarray) and np.array_equal(arr, out)


def test_whole_image_mask_covers_every_pixel_with_height_first():
    from stepfleet.serving.edits.masks import whole_image_mask

    m = whole_image_mask((96, 64))
    assert m.shape == (64, 96) and m.dtype == torch.bool and bool(m.all())


def test_default_halo_is_wider_on_small_latents():
    from stepfleet.serving.edits.masks import DEFAULT_HALO, SMALL_LATENT_HALO, default_halo

    assert default_halo(16, 16) == SMALL_LATENT_HALO == 4  # mini-sd's 64×64 images, by measurement
    assert default_halo(64, 64) == default_halo(17, 128) == DEFAULT_HALO == 1
