"""`stepfleet train mini-sd --out DIR`: train the project's small model, seeded and resumable."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _progress(phase: str, start: int, total: int) -> Iterator[int]:
    from tqdm import tqdm

    return iter(tqdm(range(start, total), initial=start, total=total, desc=phase, mininterval=2.0,
                     dynamic_ncols=True, file=sys.stderr))


def main(argv: list[str]) -> int:
    from stepfleet.training.loop import TrainConfig

    defaults = TrainConfig()
    ap = argparse.ArgumentParser(prog="stepfleet train", description=__doc__)
    ap.add_argument("model", choices=["mini-sd"])
    ap.add_argument("--out", required=True, type=Path, help="run directory: checkpoint.pt, loss.jsonl, pipeline/")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, ...")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    ap.add_argument("--init-from", type=Path, help="start from an exported pipeline's weights (fresh optimisers)")
    ap.add_argument("--export-dtype", default="float16", choices=["float16", "float32"])
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        kind = float if isinstance(value, float) or value is None else int
        ap.add_argument(flag, type=kind, default=value, help=f"(default: {value})")
    args = ap.parse_args(argv)

    import torch

    from stepfleet.serving.loading import quiet_libraries
    from stepfleet.training.fashion import DatasetMissing, load_split
    from stepfleet.training.loop import Trainer, resolve_device

    quiet_libraries()
    cfg = TrainConfig(**{k: getattr(args, k) for k in vars(defaults)})
    try:
        split = load_split("train")
    except DatasetMissing as exc:
        print(f"stepfleet train: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    trainer = Trainer(cfg, args.out, split, device, progress=_progress)
    resumed = args.resume and trainer.load()
    if args.init_from and not resumed:
        trainer.init_from(args.init_from)
    print(f"stepfleet train: {'resumed at' if resumed else 'starting'} vae step {trainer.vae_step}, "
          f"unet step {trainer.unet_step} on {device}", file=sys.stderr)
    trainer.run()
    pipeline = trainer.export(args.out / "pipeline", getattr(torch, args.export_dtype))
    summary = {"pipeline": str(pipeline), "vae_steps": trainer.vae_step, "unet_steps": trainer.unet_step,
               "scaling_factor": trainer.scaling_factor, "device": str(device),
               "wall_s": round(time.monotonic() - began, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0
