"""The shipped, trained `mini-sd`: loaded through the serving path, it draws what it is told."""

from __future__ import annotations

import torch

from stepfleet.training.scenes import COLORS


def _mean_rgb(image, box) -> tuple[float, float, float]:
    import numpy as np

    x0, y0, x1, y1 = box
    px = np.asarray(image, dtype=np.float64)[y0:y1, x0:x1].reshape(-1, 3)
    return tuple(px.mean(axis=0))


def _nearest(rgb) -> str:
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], rgb, strict=True)))


def test_mini_sd_is_a_shipped_builtin_within_budget():
    from stepfleet.serving.builtin_models import BUILTIN_MODELS, TRAINED_BUILTINS, ensure_builtin

    assert "mini-sd" in BUILTIN_MODELS
    path = ensure_builtin("mini-sd")
    assert path == TRAINED_BUILTINS["mini-sd"]
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= 30 * 2**20


def test_mini_sd_draws_the_prompted_colours():
    """Background corners take the background's colour and the centre the item's, for two
    prompts that swap them: the text conditions the picture (a small quality smoke test)."""
    from stepfleet.serving.loading import load_model

    torch.set_num_threads(2)
    pipe = load_model("mini-sd", device="cpu").pipeline
    assert pipe.unet.config.sample_size * 4 == 64
    for item, background in (("red", "blue"), ("blue", "yellow")):
        image = pipe(f"a {item} dress on a {background} background", num_inference_steps=20, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (64, 64)
        corners = [_mean_rgb(image, b) for b in ((0, 0, 6, 6), (58, 0, 64, 6), (0, 58, 6, 64), (58, 58, 64, 64))]
        assert all(_nearest(c) == background for c in corners), (item, background, corners)
        assert _nearest(_mean_rgb(image, (28, 26, 36, 38))) == item
