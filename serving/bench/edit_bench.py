"""`stepfleet bench edit`: mask-aware activation caching vs full-compute inpainting (issue 3, §5).

One run, tiny-sd at 512×512 (64×64 latents), DDIM, guidance 7.5, one seed, `steps` steps on
every side:

- `speedup[r]` (r = 0.1, 0.25, 0.5): per-request latency of diffusers'
  `StableDiffusionInpaintPipeline` (built from the same components; with a 4-channel UNet it
  runs "legacy" inpainting: outside the latent mask the latents are the image's noised latents
  at every step) over the cached path's (the engine's runner: prompt encoding, masked steps on
  the template's cached activations, VAE decode and composite), min of interleaved repeats.
  `speedup_vs_engine_full[r]` is the same against the runner's own full-compute edit path.
- `masked_psnr_db` / `masked_ssim`: the cached result vs full compute with the same template
  latents, noise and settings (the runner with `use_cache=False`, decoded in full: the figures
  include the crop decode's error, `edits.crop_decode`), inside the pixel mask;
  `unmasked_max_abs_diff`: the cached result's pixels vs the template's outside the mask (uint8);
  `full_mask_max_rel_diff`: an all-edit mask, cached vs full latents.
- `serving`: a Poisson trace of edits (mask ratios uniform in 0.05–0.5) at 0.9 of diffusers'
  one-at-a-time capacity, served by diffusers one at a time (`diffusers`), the engine with
  `use_cache=False` (`engine_uncached`) and the engine on the template cache (`engine_cached`).
  Live (in-process, requests arriving on the trace's clock) and replayed (discrete events on the
  step costs measured in this run; this machine drifts ±10–15 % and is shared). Ratios come
  from the replay.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stepfleet.serving.bench.edit_replay import (
    EditCostTable,
    EditRequest,
    edit_trace,
    masked_psnr,
    masked_ssim,
    replay_diffusers,
    replay_edit_engine,
)
from stepfleet.serving.bench.live import drive, isolated, serve_one_at_a_time
from stepfleet.serving.bench.trace import latency_stats
from stepfleet.serving.calibration import interleaved_min
from stepfleet.serving.planner import DEFAULT_SLO_SCALE

RATIOS = (0.1, 0.25, 0.5)
TEMPLATE_ID = "bench-template"


@dataclass(frozen=True)
class EditBenchConfig:
    model: str = "tiny-sd"
    size: int = 512
    steps: int = 10
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    seed: int = 3  # the template's seed; a cached edit shares its template's settings, seed included
    max_batch: int = 4
    slo_scale: float = DEFAULT_SLO_SCALE
    load: float = 0.9
    reps: int = 3  # interleaved rounds for per-request latency
    cost_reps: int = 2
    live_requests: int = 8
    replay_requests: int = 2000
    trace_seed: int = 11
    cache_bytes: int = 8 << 30
    halo: int | None = None  # None: the worker's default (`edits.masks.default_halo`)
    crop_decode: bool = False  # decode only the mask's neighbourhood (`edits.crop_decode`; off, as on the worker)
    conv_halo: int | None = None  # windowed latent-resolution convolutions (`edits.windowed_convs`; None: off)


def fitting_config(cfg: EditBenchConfig, scheduler_class: type) -> EditBenchConfig:
    """`cfg` with a scheduler the model takes: a flow-matching model (SD3, Flux) runs `flow_euler`
    where the default (`ddim`) would not fit it."""
    from dataclasses import replace

    from stepfleet.serving.schedulers import FLOW_SCHEDULERS, is_flow_matching

    if is_flow_matching(scheduler_class) and cfg.scheduler not in FLOW_SCHEDULERS:
        return replace(cfg, scheduler="flow_euler")
    return cfg


def box_mask(size: int, ratio: float, rng: random.Random | None = None) -> torch.Tensor:
    """(size, size) bool pixel mask: a square of `ratio` of the area, centred (or placed by `rng`)."""
    side = max(8, round(size * ratio**0.5))
    y0 = x0 = (size - side) // 2
    if rng is not None:
        y0, x0 = rng.randrange(size - side + 1), rng.randrange(size - side + 1)
    m = np.zeros((size, size), dtype=bool)  # numpy: the live run builds masks on the driver thread,
    m[y0 : y0 + side, x0 : x0 + side] = True  # which must not start an OpenMP pool (`live.isolated`)
    return torch.from_numpy(m)


def mask_image(mask: torch.Tensor):
    """diffusers' convention: white (1) = repaint."""
    from PIL import Image

    return Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L")


def template_image(size: int, seed: int = 0):
    """A smooth random picture (so the VAE sees structure, not white noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


class Bench:
    def __init__(self, cfg: EditBenchConfig, log) -> None:
        from diffusers import AutoPipelineForInpainting

        from stepfleet.serving.backbones import load_backbone
        from stepfleet.serving.edits.cache import TemplateCache
        from stepfleet.serving.edits.extension import EditExtension
        from stepfleet.serving.loading import load_model
        from stepfleet.serving.runner import ModelRunner

        self.log = log
        self.model = load_model(cfg.model, device="cpu")
        self.cfg = cfg = fitting_config(cfg, type(self.model.pipeline.scheduler))
        self.cache = TemplateCache(max_bytes=cfg.cache_bytes)
        backbone = load_backbone(self.model)
        from stepfleet.serving.edits.crop_decode import CropDecode

        self.edits = EditExtension(backbone, self.cache, halo=cfg.halo,
                                   crop=CropDecode() if cfg.crop_decode else CropDecode(max_fraction=0.0),
                                   conv_halo=cfg.conv_halo)
        self.crop_decoder = self.edits.decoder
        self.runner = ModelRunner(backbone, extensions=[self.edits])
        pipe = self.model.pipeline
        # The family's own inpainting pipeline from the same components (SD, SDXL, SD3, Flux).
        self.inpaint = AutoPipelineForInpainting.from_pipe(pipe)
        self.inpaint.set_progress_bar_config(disable=True)
        from stepfleet.serving.schedulers import make_scheduler

        base = pipe.scheduler
        self.inpaint.scheduler = make_scheduler(cfg.scheduler, base.config, type(base))
        self.image = template_image(cfg.size)
        self.template = None

    def close(self) -> None:
        self.edits.close()
        self.cache.close()

    # -- requests ------------------------------------------------------------------------
    def register_template(self, prompt: str = "a template photo") -> float:
        """Record `self.image` as the template (replacing any earlier one); seconds it took."""
        from stepfleet.serving.edits.templates import (
            Template,
            TemplateKey,
            TemplateState,
            image_digest,
            record_params,
        )

        c = self.cfg
        key = TemplateKey(c.size, c.size, c.steps, c.scheduler, c.guidance_scale, c.seed)
        self.edits.drop_template(TEMPLATE_ID)
        t = Template(id=TEMPLATE_ID, key=key, prompt=prompt, image=self.image,
                     digest=image_digest(self.image))
        self.edits.add_template(t)
        t0 = time.perf_counter()
        r = self.runner.prepare(record_params(t), c.seed).state
        while r.steps_left:
            self.runner.step([r])
        self.runner.decode(r)
        assert t.state is TemplateState.READY and self.edits.template_cached(t), "template recording failed"
        self.template = t
        return time.perf_counter() - t0

    def edit_params(self, mask: torch.Tensor, prompt: str = "an edited red car", use_cache: bool = True):
        from stepfleet.serving.params import EditSpec, GenerationParams

        c = self.cfg
        return GenerationParams(prompt=prompt, width=c.size, height=c.size, n=1, num_inference_steps=c.steps,
                                guidance_scale=c.guidance_scale, scheduler=c.scheduler, seed=c.seed,
                                edit=EditSpec(template_id=TEMPLATE_ID, pixel_mask=mask, use_cache=use_cache))

    def runner_edit(self, mask: torch.Tensor, use_cache: bool, output_type: str = "pil", prompt: str = "an edited red car"):
        """One edit alone through the runner, end to end: prepare, steps, decode (+ composite)."""
        from stepfleet.serving.contracts import EditPath

        r = self.runner.prepare(self.edit_params(mask, prompt, use_cache), self.cfg.seed).state
        while r.steps_left:
            self.runner.step([r])
        want = EditPath.CACHED if use_cache else EditPath.FULL
        assert r.edit_path is want, f"edit ran {r.edit_path}, expected {want}"
        return r, self.runner.decode(r, output_type=output_type).images

    def diffusers_edit(self, mask: torch.Tensor, prompt: str = "an edited red car"):
        c = self.cfg
        # strength 1 as the edits run it (SD3's and Flux's inpainting default to 0.6).
        return self.inpaint(prompt, image=self.image, mask_image=mask_image(mask), height=c.size, width=c.size,
                            num_inference_steps=c.steps, guidance_scale=c.guidance_scale, strength=1.0,
                            generator=torch.Generator().manual_seed(c.seed)).images[0]

    # -- per-request latency and accuracy ------------------------------------------------
    def per_request(self) -> dict[str, Any]:
        c = self.cfg
        masks = {r: box_mask(c.size, r) for r in RATIOS}
        out: dict[str, Any] = {"speedup": {}, "speedup_vs_engine_full": {}, "masked_psnr_db": {},
                               "masked_ssim": {}}
        # Accuracy, and one full-compute latency sample per ratio (its cost does not depend on the mask).
        full_s = []
        unmasked = 0
        base = np.asarray(self.image.convert("RGB"))
        for ratio, m in masks.items():
            t0 = time.perf_counter()
            self.edits.decoder = None  # the reference decodes in full: the figures include the crop's error
            try:
                _, ref = self.runner_edit(m, use_cache=False, output_type="np")
            finally:
                self.edits.decoder = self.crop_decoder
            full_s.append(time.perf_counter() - t0)
            r, got = self.runner_edit(m, use_cache=True, output_type="np")
            got_pil = self.runner.decode(r, output_type="pil").images
            pm = m.numpy()
            out["masked_psnr_db"][str(ratio)] = masked_psnr(got[0], ref[0], pm)
            out["masked_ssim"][str(ratio)] = masked_ssim(got[0], ref[0], pm)
            px = np.asarray(got_pil[0]).astype(np.int16)
            unmasked = max(unmasked, int(np.abs(px - base)[~pm].max()))
            self.log(f"  ratio {ratio}: masked PSNR {out['masked_psnr_db'][str(ratio)]:.1f} dB, "
                     f"SSIM {out['masked_ssim'][str(ratio)]:.4f}")
        out["unmasked_max_abs_diff"] = unmasked
        # Latency: diffusers inpainting and the cached path, round-robin, min of `reps`.
        self.diffusers_edit(masks[0.1])  # warm the inpainting pipeline
        fns: dict[Any, Any] = {"diffusers": lambda: self.diffusers_edit(masks[0.1]),
                               "engine_full": lambda: self.runner_edit(masks[0.1], use_cache=False)}
        for ratio, m in masks.items():
            fns[ratio] = lambda m=m: self.runner_edit(m, use_cache=True)
        best = interleaved_min(fns, c.reps)
        best["engine_full"] = min(best["engine_full"], *full_s)
        for ratio in RATIOS:
            out["speedup"][str(ratio)] = best["diffusers"] / best[ratio]
            out["speedup_vs_engine_full"][str(ratio)] = best["engine_full"] / best[ratio]
        out["request_s"] = {str(k): v for k, v in best.items()}
        return out

    def full_mask_rel_diff(self) -> float:
        everything = torch.ones(self.cfg.size, self.cfg.size, dtype=torch.bool)
        cached, _ = self.runner_edit(everything, use_cache=True, output_type="np")
        full, _ = self.runner_edit(everything, use_cache=False, output_type="np")
        return float((cached.latents - full.latents).abs().max() / full.latents.abs().max())

    # -- serving ---------------------------------------------------------------------------
    def measure_costs(self, diffusers_s: float) -> EditCostTable:
        c = self.cfg
        rng = random.Random(5)
        k = c.max_batch

        def batch(n: int, ratio: float, use_cache: bool):
            return [self.runner.prepare(self.edit_params(box_mask(c.size, ratio, rng), f"cost {i}", use_cache),
                                        c.seed).state for i in range(n)]

        batches: dict[Any, Any] = {("full", 1): batch(1, 0.25, False), ("full", k): batch(k, 0.25, False)}
        cost_ratios = (0.05, 0.25, 0.5)
        for ratio in cost_ratios:
            batches[(ratio, k)] = batch(k, ratio, True)
        for ratio in (0.05, *RATIOS):  # one image: explains the per-request figures
            batches[(ratio, 1)] = batch(1, ratio, True)

        def one_step(b):
            for r in b:
                r.step_index = 0  # the same step again: costs do not depend on which step
            self.runner.step(b)

        step_s = interleaved_min({key: (lambda b=b: one_step(b)) for key, b in batches.items()}, c.cost_reps)
        one = self.edit_params(box_mask(c.size, 0.25), "cost")
        done = self.runner.prepare(one, c.seed).state
        aux = interleaved_min({"encode": lambda: self.runner.prepare(one, c.seed),
                                "decode": lambda: self.runner.decode(done)}, c.cost_reps)
        return EditCostTable(
            full_step_s={n: step_s[("full", n)] for n in (1, k)},
            cached_step_s={ratio: {n: v for (r, n), v in step_s.items() if r == ratio} for ratio in cost_ratios},
            cached_one_image_step_s={ratio: step_s[(ratio, 1)] for ratio in (0.05, *RATIOS)},
            encode_s=aux["encode"], decode_s=aux["decode"], diffusers_s=diffusers_s,
        )

    def _trace_mask(self, r: EditRequest) -> torch.Tensor:
        return box_mask(self.cfg.size, r.ratio, random.Random(r.seed))

    def live_diffusers(self, trace: Sequence[EditRequest]) -> dict[str, float]:
        return serve_one_at_a_time(trace, lambda r: self.diffusers_edit(self._trace_mask(r), r.prompt))

    def live_engine(self, trace: Sequence[EditRequest], use_cache: bool, table: EditCostTable) -> dict[str, Any]:
        from stepfleet.serving.contracts import RequestKind
        from stepfleet.serving.engine import Engine, EngineConfig

        c = self.cfg
        engine = Engine(self.runner, EngineConfig(max_batch=c.max_batch, max_queue=10_000, policy="continuous",
                                                  slo_scale=c.slo_scale),
                        cost=table.cost_model(self.runner.latent_shape(c.size, c.size)))
        engine.start()
        submitted = []
        drive(trace, lambda r: submitted.append(
            engine.submit(self.edit_params(self._trace_mask(r), r.prompt, use_cache), request_id=r.id, kind=RequestKind.EDIT)))
        results = [req.future.result(timeout=3600) for req in submitted]
        engine.stop(drain=True)
        stats: dict[str, Any] = latency_stats([req.arrival for req in submitted],
                                              [req.arrival + res.total_s for req, res in zip(submitted, results,
                                                                                            strict=True)])
        paths = [res.edit_path for res in results]
        names = [p.value if p is not None else "none" for p in paths]
        stats["edit_paths"] = {p: names.count(p) for p in sorted(set(names))}
        return stats


def _per_request_and_costs(b: Bench, cfg: EditBenchConfig, quick: bool, log):
    """The offline phases: record the template, time single requests, exactness, step costs."""
    log(f"edit benchmark: {cfg.model} {cfg.size}x{cfg.size}, {cfg.steps} steps {cfg.scheduler}, "
        f"guidance {cfg.guidance_scale}, {torch.get_num_threads()} threads")
    rec_s = b.register_template()
    log(f"template recorded in {rec_s:.1f}s ({b.cache.bytes_memory / 2**20:.0f} MiB cached); per-request ...")
    out: dict[str, Any] = {"benchmark": "edit", "model": cfg.model, "size": f"{cfg.size}x{cfg.size}",
                           "latent": f"{cfg.size // 8}x{cfg.size // 8}", "steps": cfg.steps,
                           "scheduler": cfg.scheduler, "guidance_scale": cfg.guidance_scale,
                           "threads": torch.get_num_threads(), "quick": quick, "crop_decode": cfg.crop_decode,
                           "conv_halo": cfg.conv_halo,
                           "template_record_s": rec_s, "template_cache_bytes": b.cache.bytes_memory}
    out.update(b.per_request())
    log("  speedup " + ", ".join(f"{k}: {v:.2f}x" for k, v in out["speedup"].items()))
    out["full_mask_max_rel_diff"] = b.full_mask_rel_diff()
    log(f"  full-mask max rel diff {out['full_mask_max_rel_diff']:.2e}; measuring step costs ...")
    table = b.measure_costs(out["request_s"]["diffusers"])
    return out, table


def run(cfg: EditBenchConfig, quick: bool, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, Any]:
    from stepfleet.serving.planner import PlannerConfig

    t_start = time.monotonic()
    # Torch phases run on threads that end with them (see `bench.live.isolated`), so the live
    # engine's loop thread is the process's only OpenMP pool while it runs.
    b = isolated(lambda: Bench(cfg, log))
    cfg = b.cfg  # with the scheduler that fits the model
    try:
        out, table = isolated(lambda: _per_request_and_costs(b, cfg, quick, log))
        cap = 1.0 / table.diffusers_s
        rate = cfg.load * cap
        shape = b.runner.latent_shape(cfg.size, cfg.size)
        planner = PlannerConfig(max_batch=cfg.max_batch)
        long_trace = edit_trace(rate, cfg.replay_requests, seed=cfg.trace_seed)
        replay = {
            "diffusers": replay_diffusers(long_trace, table),
            "engine_uncached": replay_edit_engine(long_trace, table, cfg.steps, False, planner, cfg.slo_scale, shape),
            "engine_cached": replay_edit_engine(long_trace, table, cfg.steps, True, planner, cfg.slo_scale, shape),
        }
        trace = edit_trace(rate, cfg.live_requests, seed=cfg.trace_seed)
        live: dict[str, Any] = {}
        log(f"diffusers capacity {cap:.4f} req/s; live trace of {len(trace)} edits at {rate:.4f} req/s: diffusers ...")
        live["diffusers"] = b.live_diffusers(trace)
        log("  engine without cache ...")
        live["engine_uncached"] = b.live_engine(trace, use_cache=False, table=table)
        log("  engine with cache ...")
        live["engine_cached"] = b.live_engine(trace, use_cache=True, table=table)
        out["cost_table"] = table.as_dict()
        out["serving"] = {
            "load": cfg.load,
            "diffusers_capacity_rps": cap,
            "rate_rps": rate,
            "mask_ratios": [0.05, 0.5],
            "max_batch": cfg.max_batch,
            "replay_requests": len(long_trace),
            "live_requests": len(trace),
            "replay": replay,
            "live": live,
            "ratios_from": "replay",
            "ratios": {
                "cached_vs_diffusers_mean_latency": replay["engine_cached"]["mean_s"] / replay["diffusers"]["mean_s"],
                "cached_vs_uncached_mean_latency":
                    replay["engine_cached"]["mean_s"] / replay["engine_uncached"]["mean_s"],
            },
            "live_ratios": {
                "cached_vs_diffusers_mean_latency": live["engine_cached"]["mean_s"] / live["diffusers"]["mean_s"],
                "cached_vs_uncached_mean_latency":
                    live["engine_cached"]["mean_s"] / live["engine_uncached"]["mean_s"],
            },
        }
        out["cache_stats"] = b.cache.snapshot()
        out["wall_s"] = time.monotonic() - t_start
        return out
    finally:
        b.close()


def summary(res: dict[str, Any]) -> str:
    def cells(d):
        return ", ".join(f"{k}: {v:.3g}" for k, v in d.items())

    s = res["serving"]
    lines = [
        f"edit benchmark: {res['model']} {res['size']} ({res['latent']} latents), {res['steps']} steps "
        f"{res['scheduler']}, guidance {res['guidance_scale']}, {res['threads']} threads",
        f"  per-request seconds (min of interleaved): {cells(res['request_s'])}",
        f"  step seconds, one image: full {res['cost_table']['full_step_s_by_images']['1']:.3f}, cached "
        f"{cells(res['cost_table']['cached_one_image_step_s_by_ratio'])}; encode "
        f"{res['cost_table']['encode_s']:.3f}, decode+composite {res['cost_table']['decode_s']:.3f}",
        f"  speedup vs diffusers inpainting: {cells(res['speedup'])}  (vs engine full compute: "
        f"{cells(res['speedup_vs_engine_full'])})",
        f"  masked PSNR dB: {cells(res['masked_psnr_db'])}; masked SSIM: {cells(res['masked_ssim'])}",
        f"  unmasked_max_abs_diff: {res['unmasked_max_abs_diff']}; full_mask_max_rel_diff: "
        f"{res['full_mask_max_rel_diff']:.2e}",
        f"  serving at load {s['load']} of diffusers capacity ({s['rate_rps']:.4f} req/s), mask ratios 0.05-0.5:",
    ]
    for kind in ("live", "replay"):
        for name, st in s[kind].items():
            lines.append(f"    {kind:6s} {name:16s} mean {st['mean_s']:.2f}s p95 {st['p95_s']:.2f}s "
                         f"thr {st['throughput_rps']:.4f}/s ({st['completed']} done)")
    lines.append(f"  ratios (replay): {cells(s['ratios'])}")
    lines.append(f"  ratios (live):   {cells(s['live_ratios'])}")
    lines.append(f"  wall: {res['wall_s']:.0f}s")
    return "\n".join(lines)
