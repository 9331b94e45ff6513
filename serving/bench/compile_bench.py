"""`stepfleet bench compile`: the compiled denoiser per row bucket against the eager one.

For each row bucket: the eager `Backbone.denoise` call and the compiled one (the worker's own
`CompiledDenoiser`: on CUDA, inductor with CUDA graphs) on the same inputs — median seconds
over interleaved repetitions after warm-up, the ratio, the warm-up compile seconds, and the
largest relative difference between the two outputs. A padding check runs one row fewer than
each bucket through the compiled path (padded up) against eager on those rows alone: what
"mixed batch = solo under padding" rests on.

`--denoiser-only` builds just the denoiser of a built-in from its config directly on the
device (random weights) with conditioning tensors of the right shapes, instead of the whole
pipeline through `from_pretrained`: on a lent GPU it skips writing and reading 4-14 GB of text
encoders and VAE that a denoiser timing never touches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch

from stepfleet.serving.backbones.base import Backbone
from stepfleet.serving.compiled.buckets import RowBuckets, ShapeBuckets, parse_rows
from stepfleet.serving.compiled.denoiser import (
    CompiledDenoiser,
    CompileOptions,
    bucket_label,
    dynamo_counters,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fns: Mapping[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Interleaved timing (A, B, A, B, ...): drift on a shared machine hits both sides alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def denoiser_only(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Backbone, dict[str, torch.Tensor], int]:
    """A built-in's UNet from config on `device` behind its real backbone class, one conditioning row,
    and the default image side."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from stepfleet.serving.backbones.sd import StableDiffusionBackbone
    from stepfleet.serving.backbones.sdxl import StableDiffusionXLBackbone
    from stepfleet.serving.builtin_models import unet_config

    sdxl = "sdxl" in name
    config = unet_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).eval()
    # Only what the backbone classes read at construction: no text encoders, no VAE weights.
    no_vae = SimpleNamespace(config=SimpleNamespace(force_upcast=False), dtype=dtype)
    pipe = SimpleNamespace(unet=unet, scheduler=DDIMScheduler(), vae_scale_factor=8, text_encoder_2=None, vae=no_vae)
    backbone: Backbone = StableDiffusionXLBackbone(pipe) if sdxl else StableDiffusionBackbone(pipe)
    side = backbone.default_size[0]
    gen = torch.Generator(device="cpu").manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)}
    if sdxl:
        text = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond["text_embeds"] = torch.randn(1, text, generator=gen)
        cond["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
    return backbone, {k: v.to(device, dtype) for k, v in cond.items()}, side


def full_model(name: str, device: str, dtype: str, side: int | None) -> tuple[Backbone, dict[str, torch.Tensor], int]:
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.params import GenerationParams

    backbone = load_backbone(load_model(name, device=device, dtype=dtype))
    w = side or backbone.default_size[0]
    with torch.inference_mode():
        cond = backbone.encode_prompt(GenerationParams(prompt="a red cat", width=w, height=w), False)
    return backbone, dict(cond.positive), w


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    torch.set_grad_enabled(False)
    if args.denoiser_only:
        backbone, row, side = denoiser_only(args.model, device, dtype)
    else:
        backbone, row, side = full_model(args.model, str(device), str(dtype).removeprefix("torch."), args.size)
    side = args.size or side
    shape = tuple(backbone.latent_shape(side, side))
    buckets = ShapeBuckets(rows=RowBuckets(parse_rows(args.rows)), shapes=(shape,), sizes=((side, side),))
    compiled = CompiledDenoiser(backbone, buckets, CompileOptions(backend=args.backend, mode=args.mode))
    before = dynamo_counters()["unique_graphs"]
    print(f"compiling {buckets.count} buckets ({compiled.backend}, mode {compiled.mode}) on {device} ...",
          file=sys.stderr)
    warm = compiled.warm_up({shape: row})
    graphs = dynamo_counters()["unique_graphs"] - before
    rows_out = []
    gen = torch.Generator(device="cpu").manual_seed(2)
    with torch.inference_mode():
        for rows in buckets.rows.rows:
            sample = torch.randn((rows, *shape), generator=gen).to(device, dtype)
            timestep = torch.linspace(900, 100, rows).to(device)
            cond = {k: v.expand(rows, *v.shape[1:]).clone() for k, v in row.items()}
            eager_out = backbone.denoise(sample, timestep, cond)
            compiled_out = compiled(sample, timestep, cond)
            padded = None
            if rows > 1:  # one row fewer, padded up into this bucket, against eager on those rows alone
                sub = {k: v[: rows - 1] for k, v in cond.items()}
                padded = _rel(compiled(sample[: rows - 1], timestep[: rows - 1], sub),
                              backbone.denoise(sample[: rows - 1], timestep[: rows - 1], sub))
            inputs = (sample, timestep, cond)
            secs = _median_seconds({
                "eager": lambda inputs=inputs: backbone.denoise(*inputs),
                "compiled": lambda inputs=inputs: compiled(*inputs),
            }, args.reps, device)
            entry = {
                "rows": rows,
                "eager_ms": round(secs["eager"] * 1000, 3),
                "compiled_ms": round(secs["compiled"] * 1000, 3),
                "eager_over_compiled": round(secs["eager"] / secs["compiled"], 3),
                "compile_s": round(warm.compile_seconds[bucket_label(rows, shape)], 2),
                "max_rel_diff": _rel(compiled_out, eager_out),
                "padded_max_rel_diff": padded,
            }
            rows_out.append(entry)
            print(f"rows {rows}: eager {entry['eager_ms']:.2f} ms, compiled {entry['compiled_ms']:.2f} ms "
                  f"({entry['eager_over_compiled']:.2f}x), compile {entry['compile_s']:.1f} s, "
                  f"rel diff {entry['max_rel_diff']:.1e}", file=sys.stderr)
    graphs_after = dynamo_counters()["unique_graphs"] - before
    return {
        "model": args.model, "denoiser_only": bool(args.denoiser_only), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "size": side, "latent_shape": list(shape),
        "backend": compiled.backend, "mode": compiled.mode, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "reps": args.reps,
        "graphs_compiled": graphs, "graphs_after_timing": graphs_after, "buckets": rows_out,
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compile", help="compiled (per row bucket) vs eager denoiser calls")
    p.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (auto: float16 on CUDA)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--rows", default="1,2,4,8", help="row buckets")
    p.add_argument("--backend", default="auto")
    p.add_argument("--mode", default="auto")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--denoiser-only", action="store_true",
                   help="build only the denoiser from the built-in's config, on the device (GPU runs)")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    worst = max(b["max_rel_diff"] for b in result["buckets"])
    print(f"{result['model']} on {result['device_name']} ({result['dtype']}): graphs {result['graphs_compiled']} "
          f"for {len(result['buckets'])} buckets (after timing {result['graphs_after_timing']}); "
          + ", ".join(f"{b['rows']} rows {b['eager_over_compiled']:.2f}x" for b in result["buckets"])
          + f"; worst rel diff {worst:.1e}", file=sys.stderr)
    return 0
