"""`stepfleet bench stream`: how soon a streamed request shows something, and what previews cost the loop.

Issue 16 asks two figures of the streamed Images API, on tiny-sd at 256², 20 steps:

1. **Time to the first partial image vs time to the final image** at load 0.5: each
   request's `first partial / final` ratio (both from its arrival), median and p90 over a
   seeded Poisson trace. The target is ≤ 0.35. With `partial_images` k the first preview
   follows step `round(T/(k+1))` (`previews.partial_steps`: 5 of 20 for k = 3, 7 for k = 2),
   so the ratio is bounded below by prompt encoding and queueing, which both times share.
2. **Streaming overhead on the step loop**: the *same* trace run with and without previews;
   the ratio of mean step-loop seconds per image-step (the engine's own step timings, which
   include the preview rendering of `after_step`), plus the share of loop time spent
   rendering previews. The target is ≤ 1.05. Runs alternate plain, streamed, streamed, plain
   (one pair with `--quick`), so the ±10-15 % drift of a shared machine falls on both sides.

*Load* is relative to serving one request at a time: load 0.5 sends requests at half the rate
at which the engine finishes them one by one (`1 / solo_s`, measured in this run after a
warm-up), as `bench engine` scales its loads by the fifo capacity.

Times are measured at the engine: a partial image counts when its pixels reach the
request's sink (the HTTP layer then encodes a PNG and writes one SSE event, well under a
millisecond at 256² next to a step of tens of milliseconds); the final image when the
engine finishes the request (VAE decode included).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from stepfleet.serving.bench.live import drive, isolated
from stepfleet.serving.bench.trace import TraceRequest, latency_stats, percentile, poisson_trace
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.params import GenerationParams, StreamSpec

#: The issue's targets.
TARGET_FIRST_PARTIAL_RATIO = 0.35
TARGET_LOOP_OVERHEAD = 1.05


@dataclass(frozen=True)
class StreamBenchConfig:
    model: str = "tiny-sd"
    size: int = 256
    steps: int = 20
    #: Offered load, relative to one-at-a-time service (module docstring).
    load: float = 0.5
    partial_images: int = 3
    requests: int = 24
    max_batch: int = 4
    guidance_scale: float = 7.5
    seed: int = 7
    #: `projection` (what workers run) or `vae` (exact previews, for comparison).
    method: str = "projection"
    #: Plain/streamed pairs (ABBA order when 2).
    pairs: int = 2


class StepTimer:
    """An engine observer that sums the loop's step seconds and image-steps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.image_steps = 0
        self.steps = 0

    def on_step(self, seconds: float, batch_images: int, queue_depth: int) -> None:
        self.seconds += seconds
        self.image_steps += batch_images
        self.steps += 1

    def on_finish(self, request: object, outcome: str) -> None:
        pass

    def on_preempt(self, count: int) -> None:
        pass

    def on_batching(self, report: object) -> None:
        pass


class RenderTimer:
    """Wraps the preview extension's `render` to sum the seconds it takes (the loop pays them)."""

    def __init__(self, render: Callable[..., Any]) -> None:
        self.render = render
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.render(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def _params(r: TraceRequest, cfg: StreamBenchConfig) -> GenerationParams:
    return GenerationParams(prompt=r.prompt, width=cfg.size, height=cfg.size, num_inference_steps=r.steps,
                            scheduler=r.scheduler, seed=r.seed, guidance_scale=cfg.guidance_scale)


def run_trace(runner: Any, trace: list[TraceRequest], cfg: StreamBenchConfig, stream: bool,
              renders: RenderTimer | None) -> dict[str, Any]:
    """One live run of `trace` through a fresh engine; streamed requests record their first partial."""
    timer = StepTimer()
    engine = Engine(runner, EngineConfig(max_batch=cfg.max_batch, max_queue=10_000), observer=timer)
    engine.start()
    first: dict[str, float] = {}
    lock = threading.Lock()
    submitted: list[tuple[TraceRequest, Any]] = []
    render_before = renders.seconds if renders else 0.0

    def sink_for(rid: str) -> Callable[[int, object], None]:
        def sink(index: int, images: object) -> None:
            now = time.monotonic()
            with lock:
                first.setdefault(rid, now)
        return sink

    def send(r: TraceRequest) -> None:
        params = _params(r, cfg)
        if stream:
            params = replace(params, stream=StreamSpec(cfg.partial_images, sink_for(r.id)))
        submitted.append((r, engine.submit(params, request_id=r.id)))

    drive(trace, send)
    results = [(r, req, req.future.result(timeout=3600)) for r, req in submitted]
    engine.stop(drain=True)
    finals = [res.total_s for _, _, res in results]
    out: dict[str, Any] = {
        "latency": latency_stats([req.arrival for _, req, _ in results],
                                 [req.arrival + res.total_s for _, req, res in results]),
        "loop_s": round(timer.seconds, 4),
        "loop_steps": timer.steps,
        "image_steps": timer.image_steps,
        "s_per_image_step": timer.seconds / max(1, timer.image_steps),
    }
    if stream:
        ratios, firsts = [], []
        for r, req, res in results:
            if r.id in first:
                firsts.append(first[r.id] - req.arrival)
                ratios.append((first[r.id] - req.arrival) / res.total_s)
        out.update({
            "partials_seen": len(firsts),
            "first_partial_s": {"median": statistics.median(firsts), "p90": percentile(firsts, 0.9)},
            "final_s": {"median": statistics.median(finals), "p90": percentile(finals, 0.9)},
            "first_partial_over_final": {"median": statistics.median(ratios), "p90": percentile(ratios, 0.9),
                                         "max": max(ratios)},
            "render_s": round((renders.seconds if renders else 0.0) - render_before, 4),
        })
    return out


def solo_seconds(runner: Any, cfg: StreamBenchConfig, reps: int) -> float:
    """Median seconds to serve one request alone through the engine (after a warm-up)."""
    engine = Engine(runner, EngineConfig(max_batch=cfg.max_batch)).start()
    times = []
    try:
        for i in range(reps + 1):
            req = engine.submit(_params(TraceRequest(f"solo{i}", 0.0, cfg.steps, "euler", i, "a warm-up"), cfg))
            res = req.future.result(timeout=3600)
            if i:  # the first is the warm-up
                times.append(res.total_s)
    finally:
        engine.stop(drain=True)
    return statistics.median(times)


def run(cfg: StreamBenchConfig, quick: bool = False,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, Any]:
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.previews import PreviewExtension
    from stepfleet.serving.runner import ModelRunner

    log(f"loading {cfg.model} ...")
    backbone = load_backbone(load_model(cfg.model, device="cpu"))
    previews = PreviewExtension(backbone, method=cfg.method)
    renders = RenderTimer(previews.render)
    previews.render = renders  # type: ignore[method-assign]  # timed, same behaviour
    runner = ModelRunner(backbone, extensions=[previews])
    isolated(previews.projection)  # fitted once per model, before any timing
    solo = isolated(lambda: solo_seconds(runner, cfg, 1 if quick else 3))
    rate = cfg.load / solo
    trace = poisson_trace(rate, cfg.requests, seed=cfg.seed, steps=(cfg.steps,))
    log(f"solo request {solo:.2f} s → load {cfg.load} is {rate:.3f} req/s; {len(trace)} requests, "
        f"{cfg.size}², {cfg.steps} steps, partial_images {cfg.partial_images} ({cfg.method})")
    order = [False, True] if quick or cfg.pairs < 2 else [False, True, True, False]
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "streamed": []}
    for stream in order:
        name = "streamed" if stream else "plain"
        log(f"  live {name} ...")
        runs[name].append(isolated(lambda s=stream: run_trace(runner, trace, cfg, s, renders)))
    plain_step = statistics.mean(r["s_per_image_step"] for r in runs["plain"])
    streamed_step = statistics.mean(r["s_per_image_step"] for r in runs["streamed"])
    streamed = runs["streamed"]
    ratio_median = statistics.median(r["first_partial_over_final"]["median"] for r in streamed)
    render_share = sum(r["render_s"] for r in streamed) / max(1e-9, sum(r["loop_s"] for r in streamed))
    return {
        "config": asdict(cfg),
        "quick": quick,
        "solo_s": solo,
        "rate_rps": rate,
        "runs": runs,
        "first_partial_over_final_median": ratio_median,
        "loop_overhead_ratio": streamed_step / plain_step,
        "render_share_of_loop": render_share,
        "targets": {"first_partial_over_final": TARGET_FIRST_PARTIAL_RATIO, "loop_overhead": TARGET_LOOP_OVERHEAD},
        "meets": {"first_partial_over_final": ratio_median <= TARGET_FIRST_PARTIAL_RATIO,
                  "loop_overhead": streamed_step / plain_step <= TARGET_LOOP_OVERHEAD},
    }


def summary(result: dict[str, Any]) -> str:
    cfg = result["config"]
    s = result["runs"]["streamed"][0]
    lines = [
        f"stream bench: {cfg['model']} {cfg['size']}², {cfg['steps']} steps, load {cfg['load']} "
        f"({result['rate_rps']:.3f} req/s; solo {result['solo_s']:.2f} s), partial_images {cfg['partial_images']}, "
        f"{cfg['method']} previews{' (quick)' if result['quick'] else ''}",
        f"  first partial {s['first_partial_s']['median']:.2f} s, final {s['final_s']['median']:.2f} s (medians); "
        f"first/final median {result['first_partial_over_final_median']:.3f} "
        f"(target ≤ {result['targets']['first_partial_over_final']}, "
        f"{'met' if result['meets']['first_partial_over_final'] else 'NOT met'})",
        f"  step loop with previews / without: {result['loop_overhead_ratio']:.3f} per image-step "
        f"(target ≤ {result['targets']['loop_overhead']}, "
        f"{'met' if result['meets']['loop_overhead'] else 'NOT met'}); previews took "
        f"{result['render_share_of_loop']:.2%} of the streamed runs' loop time",
    ]
    return "\n".join(lines)
