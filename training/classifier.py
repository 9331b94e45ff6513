"""The judge of the quality harness: a small CNN trained on *real* coloured scenes.

It reads a 64×64 scene (halved to 32×32 first: the item was drawn from 28×28, so nothing is
lost; training takes about 20 minutes on two CPU cores, once) and answers three questions with
three heads — which class, which item colour, which background colour. Its penultimate
features (128 numbers) are the space the Fréchet distance is measured in, as Inception's are
for FID: a distance between the feature distributions of generated and real scenes.

Trained once per machine, seeded, and cached (`default_path`); the bench reports its own
accuracy on the real test split, so its judgement of generated images can be weighed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stepfleet.training.fashion import CLASS_NAMES, FashionSplit
from stepfleet.training.scenes import COLOR_NAMES

VERSION = "2"
#: Channels of the three stages; the last is the feature width (what Fréchet distances use).
WIDTHS = (32, 64, 128)
FEATURES = WIDTHS[-1]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SceneClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        a, b, c = WIDTHS
        self.body = nn.Sequential(
            _block(3, a), _block(a, a), nn.MaxPool2d(2),         # 32×32 → 16×16
            _block(a, b), _block(b, b), nn.MaxPool2d(2),         # 8×8
            _block(b, c), _block(c, c),                          # 8×8
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.drop = nn.Dropout(0.2)
        self.label = nn.Linear(FEATURES, len(CLASS_NAMES))
        self.item_color = nn.Linear(FEATURES, len(COLOR_NAMES))
        self.background = nn.Linear(FEATURES, len(COLOR_NAMES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 128) features of (N, 3, 64, 64) scenes in [-1, 1]."""
        return self.body(F.avg_pool2d(images, 2))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.drop(self.features(images))
        return self.label(f), self.item_color(f), self.background(f)


@dataclass(frozen=True)
class Judgement:
    """Predicted indices and the features of a batch of scenes."""

    label: torch.Tensor
    item_color: torch.Tensor
    background: torch.Tensor
    features: torch.Tensor


@torch.no_grad()
def judge(model: SceneClassifier, images: torch.Tensor, batch: int = 256) -> Judgement:
    model.eval()
    parts = []
    for chunk in images.split(batch):
        f = model.features(chunk)
        parts.append((model.label(f).argmax(1), model.item_color(f).argmax(1), model.background(f).argmax(1), f))
    return Judgement(*(torch.cat(p) for p in zip(*parts, strict=True)))


def train(split: FashionSplit, draw: Callable[[FashionSplit, int, torch.Generator], tuple[torch.Tensor, ...]],
          seed: int = 0, steps: int = 2400, batch: int = 128, lr: float = 2e-3,
          log: Callable[[str], None] = lambda _m: None) -> SceneClassifier:
    """Train on scenes `draw(split, n, generator) -> (images, labels, item_colors, backgrounds)`."""
    torch.manual_seed(seed)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    began = time.monotonic()
    model.train()
    for step in range(steps):
        images, labels, items, backgrounds = draw(split, batch, g)
        out_label, out_item, out_bg = model(images)
        loss = F.cross_entropy(out_label, labels) + F.cross_entropy(out_item, items) + F.cross_entropy(out_bg, backgrounds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log(f"classifier step {step + 1}/{steps}: loss {loss.item():.3f} ({time.monotonic() - began:.0f}s)")
    return model.eval()


def default_path(seed: int = 0) -> Path:
    root = os.environ.get("STEPFLEET_CACHE") or os.path.join(Path.home(), ".cache", "stepfleet")
    return Path(root) / "quality" / f"scene-classifier-v{VERSION}-seed{seed}.pt"


def load_or_train(path: Path, train_fn: Callable[[], SceneClassifier]) -> tuple[SceneClassifier, bool]:
    """The cached classifier at `path`, or a newly trained one saved there; (model, was_cached)."""
    if path.exists():
        model = SceneClassifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), True
    model = train_fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, False
