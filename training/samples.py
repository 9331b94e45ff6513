"""A labelled grid of a trained pipeline's images: the picture a person looks at first."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

#: (class, item colour, background) triples that cover every class and colour at least once.
GRID_PROMPTS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 4), (1, 4, 2), (2, 2, 5), (3, 5, 6), (4, 1, 7),
    (5, 6, 3), (6, 3, 0), (7, 7, 1), (8, 0, 6), (9, 4, 1),
)


def sample_grid(pipeline_dir: Path, out_png: Path, device: str = "cpu", seeds: int = 4,
                steps: int = 30, guidance_scale: float = 4.0) -> Path:
    """One row per prompt of `GRID_PROMPTS`, `seeds` images each, the caption written beside."""
    from diffusers import StableDiffusionPipeline

    from stepfleet.training.scenes import caption

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir)).to(device=device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size, label_w = 64, 300
    grid = Image.new("RGB", (label_w + seeds * size * 2, len(GRID_PROMPTS) * size * 2), "white")
    draw = ImageDraw.Draw(grid)
    for row, triple in enumerate(GRID_PROMPTS):
        text = caption(*triple)
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in range(seeds)]
        images = pipe([text] * seeds, height=size, width=size, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=gens).images
        draw.text((6, row * size * 2 + size - 6), text, fill="black")
        for col, image in enumerate(images):
            grid.paste(image.resize((size * 2, size * 2), Image.NEAREST), (label_w + col * size * 2, row * size * 2))
    grid.save(out_png)
    return out_png
