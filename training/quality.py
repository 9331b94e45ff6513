"""`stepfleet bench quality`: is the trained model any good, and what do approximations cost?

Every figure is judged by `classifier.SceneClassifier`, trained on real scenes (Fashion-MNIST
items coloured as in training) and reported with its own accuracy on the real test split:

- `generated`: `per_class` images per class, colours drawn at random, through the model's
  diffusers pipeline (what a worker serves, within float rounding — the engine's
  exactness tests hold it to that): the share whose class, item colour and background the
  classifier reads as the prompt asked;
- `frechet`: the Fréchet distance between classifier features of those images and of real
  test scenes with the same (class, colour, colour) triples, beside the same distance between
  real *training* scenes and those test scenes — the floor a perfect model would reach with
  this many samples;
- `edits`: mask-aware cached edits against full compute (the engine's runner both ways, same
  template, noise and settings) on real scenes as templates and a recolouring prompt:
  SSIM and PSNR inside the mask, the largest pixel difference outside it (0 = exact).
  Approximations that land later (bounded adapter loading, step caches) add their rows here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from stepfleet.training import classifier as clf
from stepfleet.training.fashion import CLASS_NAMES, FashionSplit, load_split
from stepfleet.training.scenes import COLOR_NAMES, caption, compose, random_colors, random_shifts

Log = Callable[[str], None]


@dataclass(frozen=True)
class QualityConfig:
    model: str = "mini-sd"
    per_class: int = 40
    steps: int = 20
    guidance_scale: float = 5.0
    scheduler: str = "ddim"
    seed: int = 0
    gen_batch: int = 50
    classifier_steps: int = 6000
    real_test_samples: int = 2000
    edit_pairs: int = 8
    edit_ratios: tuple[float, ...] = (0.1, 0.25)
    edit_steps: int = 20
    edit_halos: tuple[int | None, ...] = (None, 1, 2, 3)  # None: the worker's default
    extra: dict[str, Any] = field(default_factory=dict)


# -- real scenes ---------------------------------------------------------------------------
def draw_real(split: FashionSplit, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """`n` random real scenes: (images, labels, item colours, backgrounds)."""
    cpu = torch.device("cpu")
    idx = torch.randint(0, len(split), (n,), generator=g)
    items, bgs = random_colors(n, g, cpu)
    images = compose(torch.from_numpy(split.images[idx.numpy()]), items, bgs, random_shifts(n, g, cpu))
    return images, torch.from_numpy(split.labels[idx.numpy()]), items, bgs


def scenes_for(split: FashionSplit, triples: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Real scenes showing exactly `triples` (N, 3: class, item colour, background), items at random."""
    picks = []
    for label in triples[:, 0].tolist():
        pool = np.flatnonzero(split.labels == label)
        picks.append(int(pool[int(torch.randint(0, len(pool), (1,), generator=g))]))
    items = torch.from_numpy(split.images[picks])
    return compose(items, triples[:, 1], triples[:, 2], random_shifts(len(picks), g, torch.device("cpu")))


def accuracy(j: clf.Judgement, labels: torch.Tensor, items: torch.Tensor, bgs: torch.Tensor) -> dict[str, float]:
    ok_l, ok_i, ok_b = j.label == labels, j.item_color == items, j.background == bgs
    return {"class": _mean(ok_l), "item_color": _mean(ok_i), "background": _mean(ok_b),
            "colors": _mean(ok_i & ok_b), "all": _mean(ok_l & ok_i & ok_b)}


def _mean(x: torch.Tensor) -> float:
    return round(float(x.float().mean()), 4)


# -- Fréchet distance ------------------------------------------------------------------------
def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa−μb‖² + tr(Σa + Σb − 2(Σa Σb)^½), with tr((ΣaΣb)^½) = tr((Σa^½ Σb Σa^½)^½) (both PSD)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _sqrt_psd(sa)
    cross = np.trace(_sqrt_psd(ra @ sb @ ra))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


# -- generation --------------------------------------------------------------------------------
def prompt_triples(cfg: QualityConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed + 17)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(cfg.per_class)
    items, bgs = random_colors(len(labels), g, torch.device("cpu"))
    return torch.stack([labels, items, bgs], dim=1)


def generate(pipe: Any, triples: torch.Tensor, cfg: QualityConfig, log: Log) -> torch.Tensor:
    """Images for the triples' captions, one seed per image, as a served PNG holds them (uint8)."""
    out = []
    began = time.monotonic()
    for start in range(0, len(triples), cfg.gen_batch):
        chunk = triples[start : start + cfg.gen_batch].tolist()
        gens = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(chunk))]
        arr = pipe([caption(*t) for t in chunk], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                   generator=gens, output_type="np").images
        out.append(torch.from_numpy(np.round(arr * 255.0) / 127.5 - 1.0).permute(0, 3, 1, 2).float())
        log(f"generated {start + len(chunk)}/{len(triples)} ({time.monotonic() - began:.0f}s)")
    return torch.cat(out)


# -- cached edits ------------------------------------------------------------------------------
def edit_quality(cfg: QualityConfig, split: FashionSplit, log: Log, halo: int | None) -> dict[str, Any]:
    from PIL import Image

    from stepfleet.serving.bench.edit_bench import Bench, EditBenchConfig, box_mask
    from stepfleet.serving.bench.edit_replay import masked_psnr, masked_ssim

    bench = Bench(EditBenchConfig(model=cfg.model, size=64, steps=cfg.edit_steps, guidance_scale=cfg.guidance_scale,
                                  scheduler=cfg.scheduler, seed=cfg.seed, halo=halo), log)
    g = torch.Generator().manual_seed(cfg.seed + 29)
    per_ratio: dict[str, dict[str, list[float]]] = {str(r): {"ssim": [], "psnr": []} for r in cfg.edit_ratios}
    unmasked = 0
    try:
        for pair in range(cfg.edit_pairs):
            label = pair % len(CLASS_NAMES)
            item, bg = (int(x) for x in random_colors(1, g, torch.device("cpu")))
            new_item = (item + 1 + pair % (len(COLOR_NAMES) - 1)) % len(COLOR_NAMES)
            new_item = new_item if new_item != bg else (new_item + 1) % len(COLOR_NAMES)
            scene = scenes_for(split, torch.tensor([[label, item, bg]]), g)[0]
            bench.image = Image.fromarray(((scene.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
            bench.register_template(caption(label, item, bg))
            prompt = caption(label, new_item, bg)
            base = np.asarray(bench.image).astype(np.int16)
            for ratio in cfg.edit_ratios:
                m = box_mask(64, ratio)
                _, ref = bench.runner_edit(m, use_cache=False, output_type="np", prompt=prompt)
                r, got = bench.runner_edit(m, use_cache=True, output_type="np", prompt=prompt)
                pm = m.numpy()
                per_ratio[str(ratio)]["ssim"].append(masked_ssim(got[0], ref[0], pm))
                per_ratio[str(ratio)]["psnr"].append(masked_psnr(got[0], ref[0], pm))
                px = np.asarray(bench.runner.decode(r, output_type="pil").images[0]).astype(np.int16)
                unmasked = max(unmasked, int(np.abs(px - base)[~pm].max()))
            log(f"halo {halo}, edit pair {pair + 1}/{cfg.edit_pairs}: " + ", ".join(
                f"{k}: SSIM {v['ssim'][-1]:.4f}" for k, v in per_ratio.items()))
    finally:
        bench.close()
    out: dict[str, Any] = {}
    for ratio, v in per_ratio.items():
        psnr = [p for p in v["psnr"] if math.isfinite(p)]
        out[ratio] = {"masked_ssim_mean": round(float(np.mean(v["ssim"])), 4),
                      "masked_ssim_min": round(float(np.min(v["ssim"])), 4),
                      "masked_psnr_db_mean": round(float(np.mean(psnr)), 2) if psnr else math.inf}
    out["unmasked_max_abs_diff"] = unmasked
    out["pairs"] = cfg.edit_pairs
    return out


# -- the bench -----------------------------------------------------------------------------------
def run(cfg: QualityConfig, log: Log) -> dict[str, Any]:
    from stepfleet.serving.loading import load_model

    began = time.monotonic()
    train_split, test_split = load_split("train"), load_split("test")
    path = clf.default_path(cfg.seed).with_name(f"scene-classifier-v{clf.VERSION}-seed{cfg.seed}-{cfg.classifier_steps}.pt")
    t0 = time.monotonic()
    judge_model, cached = clf.load_or_train(
        path, lambda: clf.train(train_split, draw_real, cfg.seed, cfg.classifier_steps, log=log))
    res: dict[str, Any] = {"config": asdict(cfg), "classifier": {"cached": cached, "path": str(path),
                                                                 "seconds": round(time.monotonic() - t0, 1)}}
    g = torch.Generator().manual_seed(cfg.seed + 5)
    images, labels, items, bgs = draw_real(test_split, cfg.real_test_samples, g)
    res["classifier"]["real_test"] = accuracy(clf.judge(judge_model, images), labels, items, bgs)
    log(f"classifier on real test scenes: {res['classifier']['real_test']}")

    pipe = load_model(cfg.model, device="cpu").pipeline
    from stepfleet.serving.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config, type(pipe.scheduler))
    triples = prompt_triples(cfg)
    t0 = time.monotonic()
    generated = generate(pipe, triples, cfg, log)
    gen_s = time.monotonic() - t0
    j = clf.judge(judge_model, generated)
    res["generated"] = {"n": len(triples), "seconds": round(gen_s, 1),
                        **accuracy(j, triples[:, 0], triples[:, 1], triples[:, 2])}
    res["generated"]["per_class"] = {
        CLASS_NAMES[k]: _mean(j.label[triples[:, 0] == k] == k) for k in range(len(CLASS_NAMES))}
    ref = clf.judge(judge_model, scenes_for(test_split, triples, torch.Generator().manual_seed(cfg.seed + 7))).features
    floor = clf.judge(judge_model, scenes_for(train_split, triples, torch.Generator().manual_seed(cfg.seed + 11))).features
    res["frechet"] = {"generated_vs_real": round(frechet_distance(j.features.numpy(), ref.numpy()), 3),
                      "real_vs_real_floor": round(frechet_distance(floor.numpy(), ref.numpy()), 3),
                      "samples": len(triples)}
    log(f"generated: {res['generated']}; Fréchet {res['frechet']}")
    res["edits"] = {("default" if h is None else f"halo{h}"): edit_quality(cfg, test_split, log, h)
                    for h in cfg.edit_halos}
    res["wall_s"] = round(time.monotonic() - began, 1)
    return res


def summary(res: dict[str, Any]) -> str:
    c, gen, fd = res["classifier"]["real_test"], res["generated"], res["frechet"]
    edits = "\n".join(
        f"    {halo}: " + "; ".join(f"mask {r}: SSIM {v['masked_ssim_mean']:.4f} (min {v['masked_ssim_min']:.4f}), "
                                  f"PSNR {v['masked_psnr_db_mean']} dB" for r, v in ed.items() if isinstance(v, dict))
        + f"; outside the mask max |diff| {ed['unmasked_max_abs_diff']}"
        for halo, ed in res["edits"].items())
    return "\n".join([
        f"quality of {res['config']['model']} ({gen['n']} generated images, {res['config']['steps']} steps, "
        f"guidance {res['config']['guidance_scale']}):",
        f"  classifier on real test scenes: class {c['class']:.3f}, item colour {c['item_color']:.3f}, "
        f"background {c['background']:.3f}",
        f"  generated: class {gen['class']:.3f}, item colour {gen['item_color']:.3f}, background "
        f"{gen['background']:.3f}, both colours {gen['colors']:.3f}",
        f"  Fréchet distance (classifier features): {fd['generated_vs_real']} (real-vs-real floor "
        f"{fd['real_vs_real_floor']})",
        f"  cached edits vs full compute (masked SSIM/PSNR inside the mask, by halo):\n{edits}",
        f"  wall {res['wall_s']} s",
    ])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stepfleet bench quality", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    ap.add_argument("--quick", action="store_true", help="fewer samples and a shorter classifier run (a smoke test)")
    ap.add_argument("--model", default="mini-sd")
    ap.add_argument("--per-class", type=int)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--classifier-steps", type=int, help=f"(default: {QualityConfig.classifier_steps})")
    args = ap.parse_args(argv)
    from stepfleet.serving.loading import quiet_libraries
    from stepfleet.training.fashion import DatasetMissing

    quiet_libraries()
    torch.manual_seed(0)
    cfg = QualityConfig(model=args.model, steps=args.steps, guidance_scale=args.guidance_scale)
    if args.quick:
        cfg = QualityConfig(model=args.model, steps=args.steps, guidance_scale=args.guidance_scale, per_class=5,
                            classifier_steps=300, real_test_samples=500, edit_pairs=2)
    if args.per_class:
        cfg = QualityConfig(**{**asdict(cfg), "per_class": args.per_class})
    if args.classifier_steps:
        cfg = QualityConfig(**{**asdict(cfg), "classifier_steps": args.classifier_steps})
    log: Log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        res = run(cfg, log)
    except DatasetMissing as exc:
        print(f"stepfleet bench quality: {exc}", file=sys.stderr)
        return 2
    print(summary(res), file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=2))
    return 0
