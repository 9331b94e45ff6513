"""Scenes, captions and the caption tokenizer: what mini-sd learns from."""

from __future__ import annotations

import torch

from stepfleet.training.fashion import CLASS_NAMES
from stepfleet.training.scenes import (
    COLOR_NAMES,
    COLORS,
    SIZE,
    caption,
    compose,
    random_colors,
    vocabulary,
)


def test_caption_reads_as_english():
    assert caption(9, COLOR_NAMES.index("red"), COLOR_NAMES.index("blue")) == "a red ankle boot on a blue background"
    assert caption(0, COLOR_NAMES.index("orange"), 0).startswith("an orange t-shirt on a")


def test_compose_paints_item_and_background_in_their_colours():
    item = torch.zeros(1, 28, 28, dtype=torch.uint8)
    item[0, 4:24, 4:24] = 255  # a white square: the silhouette
    red, blue = COLOR_NAMES.index("red"), COLOR_NAMES.index("blue")
    x = compose(item, torch.tensor([red]), torch.tensor([blue]))
    assert x.shape == (1, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    rgb = lambda px: tuple(round(float(v)) for v in (px + 1) * 127.5)  # noqa: E731
    assert rgb(x[0, :, SIZE // 2, SIZE // 2]) == COLORS["red"]  # centre: the item at full shade
    assert rgb(x[0, :, 1, 1]) == COLORS["blue"]  # corner: background


def test_compose_jitter_moves_the_item():
    item = torch.zeros(1, 28, 28, dtype=torch.uint8)
    item[0, 10:18, 10:18] = 255
    base = compose(item, torch.tensor([0]), torch.tensor([4]))
    moved = compose(item, torch.tensor([0]), torch.tensor([4]), shifts=torch.tensor([[2, -3]]))
    assert torch.allclose(torch.roll(base, (2, -3), dims=(2, 3)), moved, atol=1e-5)


def test_random_colours_never_match():
    g = torch.Generator().manual_seed(0)
    item, bg = random_colors(5000, g, torch.device("cpu"))
    assert (item != bg).all() and set(item.tolist()) == set(range(len(COLORS)))


def test_caption_words_are_whole_tokens_and_training_matches_the_shipped_tokenizer(tmp_path):
    import json

    from stepfleet.serving.builtin_models import TRAINED_BUILTINS
    from stepfleet.training.mini_sd import make_tokenizer

    tok = make_tokenizer(tmp_path)
    words = vocabulary()
    assert {"ankle", "boot", "background", "purple"} <= set(words)
    # Word merges rank after the byte-level tokenizer's handful ("a n", "a t</w>"), which win
    # inside three words; the shipped model was trained on exactly this tokenisation.
    split = {w: tok.tokenize(w) for w in words if tok.tokenize(w) != [w + "</w>"]}
    assert split == {"coat": ["co", "at</w>"], "orange": ["or", "an", "g", "e</w>"],
                     "sandal": ["s", "an", "d", "a", "l</w>"]}
    assert tok.tokenize("a dog") == ["a</w>", "d", "o", "g</w>"]  # unseen words still tokenise
    shipped = TRAINED_BUILTINS["mini-sd"] / "tokenizer"
    assert json.loads((shipped / "vocab.json").read_text()) == json.loads((tmp_path / "vocab.json").read_text())
    assert (shipped / "merges.txt").read_text() == (tmp_path / "merges.txt").read_text()
    assert len(CLASS_NAMES) == 10
