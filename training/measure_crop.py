"""Measure crop decoding (`crop_decode`) against the full decode: error inside the mask, and time.

    python -m stepfleet.training.measure_crop --model tiny-sd --size 512 --margins 0 2 4 8 12

For each mask (a square of each ratio, centred and at random places) and margin: masked PSNR and
SSIM of the crop decode vs the full decode of the same latents inside the mask, with the crop's
own GroupNorm statistics ("own") and with the template's (`NormStats`, "template"), and the
decode's seconds (min of `--reps`). The edit's latents are a template picture's with another
picture's painted into the mask (smooth random pictures; `--model mini-sd`: mosaics of real
scenes at its trained scale, hence this lives beside the training code). The default margin,
`crop_decode.DEFAULT_MARGIN`, was chosen with it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import numpy as np
import torch


def _images(model: str, size: int, n: int) -> list[Any]:
    from stepfleet.serving.bench.edit_bench import template_image

    if model != "mini-sd":
        return [template_image(size, seed=i) for i in range(n)]
    from PIL import Image

    from stepfleet.training.fashion import load_split
    from stepfleet.training.quality import draw_real

    split = load_split("test")
    k = max(1, size // 64)  # a k×k mosaic of 64×64 scenes: the trained VAE's own scale, on a larger latent
    images = draw_real(split, n * k * k, torch.Generator().manual_seed(0))[0]
    out = []
    for i in range(n):
        tiles = ((images[i * k * k : (i + 1) * k * k] + 1) / 2).clamp(0, 1)  # scenes are in [-1, 1]
        rows = [torch.cat(list(tiles[r * k : (r + 1) * k]), dim=2) for r in range(k)]
        mosaic = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
        out.append(Image.fromarray((mosaic * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC))
    return out


@torch.inference_mode()  # scoped: a global set_grad_enabled(False) leaked into later tests
def measure(model: str, size: int, margins: list[int], ratios: list[float], places: int, reps: int,
            n_images: int = 1) -> dict[str, Any]:
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.bench.edit_bench import box_mask
    from stepfleet.serving.bench.edit_replay import masked_psnr, masked_ssim
    from stepfleet.serving.edits.crop_decode import (
        CropDecode,
        NormStats,
        crop_box,
        decode_edit,
        recording_norm_stats,
        vae_decoder,
    )
    from stepfleet.serving.edits.masks import latent_mask
    from stepfleet.serving.loading import load_model

    backbone = load_backbone(load_model(model, device="cpu"))
    vae = getattr(backbone, "decode_vae", None) or backbone.pipe.vae
    decoder = vae_decoder(vae)
    assert decoder is not None, f"{model}: its VAE cannot crop-decode"
    out: dict[str, Any] = {"model": model, "size": size, "results": []}

    def timed(fn):
        best, got = float("inf"), None
        for _ in range(reps):
            t0 = time.perf_counter()
            got = fn()
            best = min(best, time.perf_counter() - t0)
        return got, best

    images = _images(model, size, n_images + 1)
    other = backbone.encode_image(images[-1])  # what an edit paints into the mask: another picture
    for image in images[:-1]:
        template = backbone.encode_image(image)
        stats = NormStats(*template.shape[-2:])
        with recording_norm_stats(decoder, stats):
            backbone.decode(template, output_type="np")
        for ratio in ratios:
            rng = random.Random(1)
            for place in range(places):
                pm = box_mask(size, ratio, rng if place else None)
                lm = latent_mask(pm, size // template.shape[-1])
                latents = torch.where(lm, other, template)  # the edit's final latents
                full, full_s = timed(lambda latents=latents: backbone.decode(latents, output_type="np"))
                out["full_decode_s"] = full_s
                for margin in margins:
                    box = crop_box(lm, CropDecode(margin=margin, max_fraction=1.0, block=stats.block))
                    inner = crop_box(lm, CropDecode(margin=0, max_fraction=1.0, block=stats.block))
                    assert box is not None and inner is not None
                    for name, use in (("own", None), ("template", stats)):
                        def crop(latents=latents, box=box, pm=pm, use=use, inner=inner, image=image):
                            return decode_edit(lambda: backbone.decode(latents, output_type="np"), decoder, box,
                                               image, pm, latents.shape[-2], use, inner)

                        got, s = timed(crop)
                        m = pm.numpy()
                        out["results"].append({
                            "ratio": ratio, "place": place, "margin": margin, "stats": name,
                            "crop_fraction": box.cells / (latents.shape[-2] * latents.shape[-1]),
                            "masked_psnr_db": masked_psnr(got[0], full[0], m),
                            "masked_ssim": masked_ssim(got[0], full[0], m), "decode_s": s})
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--margins", type=int, nargs="+", default=[0, 2, 4, 8, 12])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--places", type=int, default=3, help="mask positions per ratio (the first centred)")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)
    res = measure(a.model, a.size, a.margins, a.ratios, a.places, a.reps, a.images)
    print(json.dumps(res, indent=1))
    rows: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in res["results"]:
        rows.setdefault((r["stats"], r["ratio"], r["margin"]), []).append(r)
    print(f"full decode {res['full_decode_s']:.3f}s", file=sys.stderr)
    for (stats, ratio, margin), rs in sorted(rows.items()):
        print(f"{stats} stats, ratio {ratio} margin {margin:2d}: crop {np.mean([r['crop_fraction'] for r in rs]):.2f} of latent, "
              f"PSNR min {min(r['masked_psnr_db'] for r in rs):.1f} dB, SSIM min {min(r['masked_ssim'] for r in rs):.4f}, "
              f"decode {np.mean([r['decode_s'] for r in rs]):.3f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
