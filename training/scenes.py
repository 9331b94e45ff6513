"""Coloured scenes made from Fashion-MNIST items, with captions, so that prompts matter.

An item (28×28, grey) becomes a silhouette in one of `COLORS`, shaded by its own texture,
scaled up and placed (with a little jitter) on a background of another colour at 64×64:
"a red ankle boot on a blue background". Three things a prompt controls — class, item
colour, background colour — and three a classifier can check. Pure tensor code: the same
function draws training batches on the GPU and reference images for the quality harness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepfleet.training.fashion import CLASS_NAMES

#: Colour names and their RGB values, far enough apart that a classifier never confuses them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (240, 215, 40),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (140, 55, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZE = 64
ITEM_SIZE = 52
JITTER = 3


@dataclass(frozen=True)
class SceneSpec:
    """What one scene shows: indices into `CLASS_NAMES` and `COLOR_NAMES`."""

    label: int
    item_color: int
    background: int

    @property
    def caption(self) -> str:
        return caption(self.label, self.item_color, self.background)


def caption(label: int, item_color: int, background: int) -> str:
    color = COLOR_NAMES[item_color]
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {CLASS_NAMES[label]} on a {COLOR_NAMES[background]} background"


def vocabulary() -> list[str]:
    """Every word a caption uses (what the tokenizer learns as whole tokens)."""
    words: set[str] = {"a", "an", "on", "background"}
    for name in CLASS_NAMES + COLOR_NAMES:
        words.update(name.replace("-", " - ").split())
    words.discard("-")
    return sorted(words)


def _palette(device: torch.device) -> torch.Tensor:
    return torch.tensor(list(COLORS.values()), dtype=torch.float32, device=device) / 127.5 - 1.0


def random_colors(n: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Item and background colour indices, never equal (a black item on black is no picture)."""
    k = len(COLORS)
    item = torch.randint(0, k, (n,), generator=generator, device=device)
    offset = torch.randint(1, k, (n,), generator=generator, device=device)
    return item, (item + offset) % k


def compose(
    items: torch.Tensor,
    item_color: torch.Tensor,
    background: torch.Tensor,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scenes (N, 3, 64, 64) in [-1, 1] from grey items (N, 28, 28 uint8) and colour indices.

    The item's mask (its grey level, sharpened) cuts the silhouette; inside it the colour is
    shaded by the grey level (0.45–1.0), so seams and textures stay visible in any colour.
    `shifts` (N, 2) are pixel offsets within ±JITTER (default: centred).
    """
    n = items.shape[0]
    device = items.device
    grey = items.to(torch.float32).unsqueeze(1) / 255.0
    # One resampling does scale-up, centring and jitter: output coordinates (normalised to
    # [-1, 1]) map into the 28×28 item; anything outside it reads zero (background).
    scale = SIZE / ITEM_SIZE
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    if shifts is not None:
        theta[:, 0, 2] = -shifts[:, 1].to(torch.float32) * 2.0 * scale / SIZE
        theta[:, 1, 2] = -shifts[:, 0].to(torch.float32) * 2.0 * scale / SIZE
    grid = F.affine_grid(theta, [n, 1, SIZE, SIZE], align_corners=False)
    grey = F.grid_sample(grey, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = (grey * 4.0).clamp(0.0, 1.0)
    shade = 0.45 + 0.55 * grey
    palette = _palette(device)
    fg = (palette[item_color].view(n, 3, 1, 1) + 1.0) * shade - 1.0
    bg = palette[background].view(n, 3, 1, 1).expand(n, 3, SIZE, SIZE)
    return bg * (1.0 - mask) + fg * mask


def random_shifts(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(-JITTER, JITTER + 1, (n, 2), generator=generator, device=device)
