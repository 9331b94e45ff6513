"""`stepfleet bench engine`: continuous batching vs request-level batching vs one at a time.

One run, one seeded Poisson trace (steps mixed 10/20/30, schedulers mixed) at loads relative
to the measured capacity of `fifo` (replayed at 0.7, 0.9, 1.1, 1.2 and 2.0; live by default
at 0.7, 1.2 and 2.0):

- `fifo`: diffusers' `StableDiffusionPipeline`, one request at a time (a plain FastAPI +
  diffusers server);
- `static`: request-level batching on the same engine machinery (fill to max batch or a
  wait timeout, run that batch to completion);
- `peer`: the dynamic batching users get from Ray Serve's `@serve.batch` or
  LitServe — collect up to max batch requests or wait 0.1 s, split them into groups with
  equal step counts, run each group to completion as one pipeline call. The comparison a
  user would make, inside the project's own benchmark (issue 21);
- `continuous`: the step-level engine.

Each policy runs live, and the same trace is replayed (discrete events) on the step-cost
table measured at the start of the run, because these machines drift ±10–15 %. The replay
ratios are the design's figures; the live rows against `peer` are the check that matters to
a user. `--noise` runs a CPU-bound process on one core during the live runs. The engines are
still seeded with the quiet cost table (their curve is wrong and must be re-learned online), but
the live loads are relative to fifo's capacity measured live beside the noise (`fifo_probe_rps`):
on two cores the servers run at about a third of their quiet speed there, and loads taken from
the quiet capacity made every live load an overload of 1.8-5x (session 8).
`solo_vs_mixed_max_rel_diff` re-runs requests from the live continuous run alone and
compares final latents.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from stepfleet.serving.bench.live import (
    cpu_noise,
    drive,
    isolated,
    serve_dynamic_batches,
    serve_one_at_a_time,
)
from stepfleet.serving.bench.replay import (
    CostTable,
    fifo_capacity_rps,
    replay_engine,
    replay_fifo,
    replay_peer,
)
from stepfleet.serving.bench.trace import (
    SCHEDULER_MIX,
    STEP_MIX,
    TraceRequest,
    live_stats,
    poisson_trace,
    pooled_stats,
)
from stepfleet.serving.calibration import curve_steps, interleaved_min
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.planner import DEFAULT_SLO_SCALE, PlannerConfig

if TYPE_CHECKING:
    from stepfleet.serving.engine import EngineResult
    from stepfleet.serving.loading import LoadedModel
    from stepfleet.serving.runner import ModelRunner

LOADS = (0.7, 0.9, 1.1, 1.2, 2.0)
LIVE_LOADS = (0.7, 1.2, 2.0)
POLICIES = ("fifo", "static", "peer", "continuous")
PAIR = ("peer", "continuous")  # what the live figures compare; repeated in alternating order


def live_order(rounds: int, baselines: bool = True) -> list[tuple[int, str]]:
    """(round, policy) in the order they run: every policy once, then the pair reversed, forward, ...

    With two rounds the pair runs peer, continuous, continuous, peer (A B B A): a drift that is
    linear over the four runs costs both the same. `baselines=False` leaves out the live fifo
    and static runs (replayed all the same), which take a third of the live time and are not
    part of the peer figure.
    """
    out = [(0, p) for p in POLICIES if baselines or p in PAIR]
    for r in range(1, rounds):
        out += [(r, p) for p in (PAIR[::-1] if r % 2 else PAIR)]
    return out


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny-sd"
    device: str = "auto"
    dtype: str = "auto"
    size: int = 256
    max_batch: int = 4
    guidance_scale: float = 7.5
    static_wait_s: float = 0.5
    slo_scale: float = DEFAULT_SLO_SCALE
    seed: int = 7
    live_requests: int = 40
    replay_requests: int = 2000
    live_loads: tuple[float, ...] = LIVE_LOADS
    #: Live rounds of the compared pair (peer, continuous): round 1 runs every policy, later rounds
    #: only the pair, in the opposite order each time, and each policy's rounds are pooled
    #: (`trace.pooled_stats`): a drift of the machine lands on both, and the p95 reads 2x the samples.
    live_rounds: int = 2
    #: Run fifo and static live too (round 1); without, only the pair runs live.
    live_baselines: bool = True
    solo_checks: int = 4
    #: A CPU-bound competing process on one core during the live runs.
    noise: bool = False
    #: The peer's batch wait (Ray Serve's `batch_wait_timeout_s`, LitServe's `batch_timeout`).
    peer_wait_s: float = 0.1
    #: Also run the continuous engine with the denoiser compiled per row bucket (issue 20), against
    #: the eager one on the same traces: `live_compiled_vs_eager`.
    compile: bool = False
    compile_backend: str = "auto"


def _params(r: TraceRequest, cfg: BenchConfig) -> GenerationParams:
    return GenerationParams(
        prompt=r.prompt, width=cfg.size, height=cfg.size, num_inference_steps=r.steps, scheduler=r.scheduler,
        seed=r.seed, guidance_scale=cfg.guidance_scale,
    )


def scheduler_mix(model: LoadedModel) -> tuple[str, ...]:
    """The trace's schedulers that fit the model (SD3/Flux: flow matching; `schedulers.fitting_mix`)."""
    from stepfleet.serving.schedulers import fitting_mix

    return fitting_mix(type(model.pipeline.scheduler), SCHEDULER_MIX)


def rows_per_image_of(runner: ModelRunner, cfg: BenchConfig) -> int:
    """Denoiser rows per image: two with classifier-free guidance, one for a family without it (Flux)."""
    return 2 if cfg.guidance_scale > 1 and runner.backbone.capabilities.guidance else 1


def measure_costs(model: LoadedModel, runner: ModelRunner, cfg: BenchConfig, quick: bool) -> CostTable:
    """The step-cost table the replay uses, measured now on this machine.

    Batches are measured as the live engine runs them (`calibration.curve_steps`: k requests
    of one image each, schedulers cycling through the trace's mix); the pipeline is timed at
    10 and 30 steps over the same scheduler mix. All of it is timed in one round-robin, so a
    minute in which the machine runs faster or slower touches the engine and fifo alike
    (timed one group after the other, the two once came out 44.5 ms and 65.0 ms per step).
    """
    import torch

    from stepfleet.serving.schedulers import make_scheduler

    # Five rounds: with three, the engine's one-image step came out 1.13x and 1.39x the
    # pipeline's in two runs an hour apart (session 9), which moved the replay's fifo ratio.
    reps = 2 if quick else 5
    rows_per_image = rows_per_image_of(runner, cfg)
    mix = scheduler_mix(model)
    fns: dict[Any, Any] = {
        ("step", rows): fn
        for rows, fn in curve_steps(runner, cfg.size, cfg.size, cfg.guidance_scale, cfg.max_batch, reps,
                                    mix).items()
    }
    one = GenerationParams(prompt="cost", width=cfg.size, height=cfg.size, num_inference_steps=10,
                           guidance_scale=cfg.guidance_scale)
    done = runner.prepare(one, 0).state
    fns["encode"] = lambda: runner.prepare(one, 0)
    fns["decode"] = lambda: runner.decode(done)

    pipe = model.pipeline
    base = pipe.scheduler

    def pipeline_call(steps: int, scheduler: str) -> None:
        pipe.scheduler = make_scheduler(scheduler, base.config, type(base))
        pipe("cost", height=cfg.size, width=cfg.size, num_inference_steps=steps, guidance_scale=cfg.guidance_scale,
             generator=torch.Generator().manual_seed(0))

    for steps in (10, 30):
        for sch in mix:
            fns[("pipe", steps, sch)] = partial(pipeline_call, steps, sch)
    try:
        pipeline_call(2, mix[0])
        best = interleaved_min(fns, reps, warmup=1)
    finally:
        pipe.scheduler = base
    step_s = {rows: best[("step", rows)] for rows in range(rows_per_image, (cfg.max_batch + 1) * rows_per_image,
                                                             rows_per_image)}
    t10 = statistics.fmean(best[("pipe", 10, sch)] for sch in mix)
    t30 = statistics.fmean(best[("pipe", 30, sch)] for sch in mix)
    fifo_step = (t30 - t10) / 20
    if fifo_step <= 0:  # too noisy to fit a line: fall back to the engine's own single-request step
        fifo_step = step_s[rows_per_image]
    return CostTable(step_s_by_rows=step_s, encode_s=best["encode"], decode_s=best["decode"], fifo_step_s=fifo_step,
                     fifo_overhead_s=max(0.0, t10 - 10 * fifo_step))


def run_live_fifo(model: LoadedModel, trace: Sequence[TraceRequest], cfg: BenchConfig) -> dict[str, float]:
    """One pipeline call at a time, FCFS, requests arriving on the trace's clock."""
    import torch

    from stepfleet.serving.schedulers import make_scheduler

    pipe = model.pipeline
    base = pipe.scheduler

    def handle(r: TraceRequest) -> None:
        pipe.scheduler = make_scheduler(r.scheduler, base.config, type(base))
        pipe(r.prompt, height=cfg.size, width=cfg.size, num_inference_steps=r.steps,
             guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(r.seed))

    try:
        return serve_one_at_a_time(trace, handle)
    finally:
        pipe.scheduler = base


def fifo_probe_rps(model: LoadedModel, cfg: BenchConfig, schedulers: Sequence[str], rounds: int = 2) -> float:
    """fifo's capacity measured live: a backlog served back to back, requests per second of its span.

    The backlog holds each step count of the trace's mix `rounds` times (schedulers cycling),
    so its mean step count is the trace's. Why not the cost table timed beside the noise: its
    per-step figure is a line through two pipeline timings, and a busy neighbour bends that
    line; in session 9 it put fifo's capacity at 0.268 req/s while fifo served 0.317 req/s live
    at load 2.0, so "load 1.2" offered less than either batching server could serve and the
    throughput comparison read the trace's tail (0.303 vs 0.306 req/s).
    """
    steps = [s for _ in range(rounds) for s in STEP_MIX]
    backlog = [TraceRequest(id=f"probe{i}", arrival_s=0.0, steps=n, scheduler=schedulers[i % len(schedulers)],
                            seed=i, prompt="capacity probe") for i, n in enumerate(steps)]
    run_live_fifo(model, backlog[:1], cfg)  # warm: the first call after a pause is slower
    return float(run_live_fifo(model, backlog, cfg)["throughput_rps"])


def probe_step_s(runner: ModelRunner, cfg: BenchConfig, scheduler: str, steps: int = 8) -> float:
    """The machine's speed now: median seconds of one single-image denoising step.

    Timed just before each live round, so a comparison can be read against how fast the
    machine was while each server ran. Why: on these VMs the same step moved from 34 to 54 ms
    within nine minutes (session 12), larger than the margins being measured; a ratio taken
    in a slow minute for one server and a fast one for the other is the minute, not the server.
    """
    probe = TraceRequest(id="speed-probe", arrival_s=0.0, steps=steps + 1, scheduler=scheduler, seed=0,
                         prompt="speed probe")
    state = runner.prepare(_params(probe, cfg), probe.seed).state
    runner.step([state])  # warm: the first step after a pause is slower
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.step([state])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_during(runs: dict[str, list[dict[str, Any]]], policy: str, baseline: str) -> dict[str, float] | None:
    """Mean probe step time during `policy`'s rounds and `baseline`'s, and their ratio (> 1: slower for policy)."""
    a = [r["probe_step_s"] for r in runs.get(policy, []) if "probe_step_s" in r]
    b = [r["probe_step_s"] for r in runs.get(baseline, []) if "probe_step_s" in r]
    if not a or not b:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    return {f"{policy}_probe_s": ma, f"{baseline}_probe_s": mb, f"{policy}_vs_{baseline}": ma / mb}


def run_live_peer(model: LoadedModel, trace: Sequence[TraceRequest], cfg: BenchConfig) -> dict[str, float]:
    """Ray Serve / LitServe-style dynamic batching around the plain pipeline (see the module docstring).

    A group is one pipeline call, so it shares one step count and one scheduler: like a user's
    deployment, the call uses the pipeline's scheduler of the group's first request (per-step
    scheduler arithmetic is negligible next to the UNet, so timing is not flattered either way).
    """
    import torch

    from stepfleet.serving.schedulers import make_scheduler

    pipe = model.pipeline
    base = pipe.scheduler

    def run_group(group: list[TraceRequest]) -> None:
        first = group[0]
        pipe.scheduler = make_scheduler(first.scheduler, base.config, type(base))
        pipe([r.prompt for r in group], height=cfg.size, width=cfg.size, num_inference_steps=first.steps,
             guidance_scale=cfg.guidance_scale, generator=[torch.Generator().manual_seed(r.seed) for r in group])

    try:
        return serve_dynamic_batches(trace, run_group, lambda r: r.steps, cfg.max_batch, cfg.peer_wait_s)
    finally:
        pipe.scheduler = base


def run_live_engine(
    runner: ModelRunner, trace: Sequence[TraceRequest], cfg: BenchConfig, policy: str, table: CostTable,
    keep_latents: bool = False,
) -> tuple[dict[str, float], list[tuple[TraceRequest, EngineResult]]]:
    # Calibrated with this run's table, as a worker calibrates itself after warm-up.
    buckets = runner.compiled.buckets.rows.rows if runner.compiled is not None else None
    engine = Engine(runner, EngineConfig(max_batch=cfg.max_batch, max_queue=10_000, policy=policy,
                                         static_wait_s=cfg.static_wait_s, slo_scale=cfg.slo_scale,
                                         row_buckets=buckets),
                    cost=table.cost_model(runner.latent_shape(cfg.size, cfg.size)))
    engine.keep_latents = keep_latents
    engine.start()
    submitted: list[tuple[TraceRequest, Any]] = []
    drive(trace, lambda r: submitted.append((r, engine.submit(_params(r, cfg), request_id=r.id))))
    results = [(r, req.future.result(timeout=3600)) for r, req in submitted]
    engine.stop(drain=True)
    arrivals = [req.arrival for _, req in submitted]
    finishes = [req.arrival + res.total_s for (_, req), (_, res) in zip(submitted, results, strict=True)]
    stats: dict[str, Any] = dict(live_stats(arrivals, finishes))
    b = engine.batching()  # how the run ended: the rule, the cap, the learned curve
    stats["batching"] = {"mode": b.mode, "cap_images": b.cap_images, "reason": b.reason,
                         "step_s_by_unet_rows": {k: {str(r): s for r, s in c.items()} for k, c in b.curves.items()}}
    return stats, results


def pool_rounds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One policy's live rounds as one row (`trace.pooled_stats`), keeping how the last engine run ended
    and the machine's speed before each round (`probe_step_s`)."""
    out: dict[str, Any] = dict(runs[0]) if len(runs) == 1 else pooled_stats(runs)
    if any("probe_step_s" in r for r in runs):
        out["probe_step_s"] = [r.get("probe_step_s") for r in runs]
    if "batching" in runs[-1]:
        out["batching"] = runs[-1]["batching"]
    return out


def solo_vs_mixed(runner: ModelRunner, results: Sequence[tuple[TraceRequest, EngineResult]], cfg: BenchConfig) -> float:
    """Largest relative difference between a request's latents in the live run and alone."""
    worst = 0.0
    for r, res in list(results)[: cfg.solo_checks]:
        t = runner.prepare(_params(r, cfg), r.seed).state
        while t.steps_left:
            runner.step([t])
        solo = t.latents.detach().to("cpu")
        worst = max(worst, float((res.latents - solo).abs().max() / solo.abs().max()))
    return worst


def run(cfg: BenchConfig, quick: bool, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict[str, Any]:
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    t_start = time.monotonic()

    def load_and_measure() -> tuple[LoadedModel, ModelRunner, CostTable]:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        runner = ModelRunner(load_backbone(model))
        log(f"measuring step costs on {model.backend.name} ({model.backend.dtype}) ...")
        return model, runner, measure_costs(model, runner, cfg, quick)

    # Torch phases run on threads that end with them (see `isolated`); the live engines'
    # loop threads and the fifo server thread are likewise the only torch thread while they run.
    model, runner, table = isolated(load_and_measure)
    compiled_runner, compiled_table, compile_info = None, None, None
    if cfg.compile:
        compiled_runner, compiled_table, compile_info = isolated(partial(_compiled_setup, model, runner, cfg, quick,
                                                                         log))
    cap = fifo_capacity_rps(table, STEP_MIX)
    log(f"fifo capacity {cap:.3f} req/s; step seconds by UNet rows: "
        + ", ".join(f"{k}: {v * 1000:.1f}ms" for k, v in sorted(table.step_s_by_rows.items())))
    # The live loads are relative to the capacity the live runs see: under `--noise` that is the
    # capacity measured beside the busy process (a third of the quiet one on two cores), or every
    # "load" would be an overload. The engines stay seeded with the quiet table, as a worker
    # calibrated before its neighbour arrived is: following that drift is the online curve's job.
    live_cap = cap
    if cfg.noise:
        log("measuring fifo's capacity beside the competing process (the live loads' capacity) ...")
        with cpu_noise(True):
            live_cap = fifo_probe_rps(model, cfg, scheduler_mix(model))
    log(f"live loads relative to {live_cap:.3f} req/s")
    continuous = PlannerConfig(max_batch=cfg.max_batch)
    static = PlannerConfig(max_batch=cfg.max_batch, policy="static", static_wait_s=cfg.static_wait_s)
    rows = rows_per_image_of(runner, cfg)
    shape = runner.latent_shape(cfg.size, cfg.size)
    mix = scheduler_mix(model)
    loads_out = []
    solo_diff = None
    for load in sorted(set(LOADS) | set(cfg.live_loads)):
        entry: dict[str, Any] = {"load": load, "rate_rps": load * cap}
        long_trace = poisson_trace(load * cap, cfg.replay_requests, seed=cfg.seed, schedulers=mix)
        entry["replay"] = {
            "fifo": replay_fifo(long_trace, table),
            "static": replay_engine(long_trace, table, static, rows, cfg.slo_scale, shape),
            "continuous": replay_engine(long_trace, table, continuous, rows, cfg.slo_scale, shape),
            "peer": replay_peer(long_trace, table, cfg.max_batch, cfg.peer_wait_s),
        }
        if load in cfg.live_loads:
            trace = poisson_trace(load * live_cap, cfg.live_requests, seed=cfg.seed, schedulers=mix)
            entry["live_rate_rps"] = load * live_cap
            runs: dict[str, list[dict[str, Any]]] = {}
            results: list[Any] = []
            with cpu_noise(cfg.noise):
                for rnd, policy in live_order(cfg.live_rounds, cfg.live_baselines):
                    log(f"load {load}: live {policy}" + (f", round {rnd + 1}" if cfg.live_rounds > 1 else "")
                        + (f" ({len(trace)} requests{', noise' if cfg.noise else ''})" if not runs else "") + " ...")
                    probe = isolated(partial(probe_step_s, runner, cfg, mix[0]))
                    if policy == "fifo":
                        stats = run_live_fifo(model, trace, cfg)
                    elif policy == "peer":
                        stats = run_live_peer(model, trace, cfg)
                    elif policy == "static":
                        stats, _ = run_live_engine(runner, trace, cfg, "static", table)
                    else:
                        stats, kept = run_live_engine(runner, trace, cfg, "continuous", table, keep_latents=not results)
                        results = results or kept
                    runs.setdefault(policy, []).append({**stats, "probe_step_s": probe})
                if compiled_runner is not None and compiled_table is not None:
                    log(f"load {load}: live continuous, compiled ...")
                    runs["compiled"] = [run_live_engine(compiled_runner, trace, cfg, "continuous", compiled_table)[0]]
            live: dict[str, Any] = {p: pool_rounds(r) for p, r in runs.items()}
            entry["live"] = live
            if "compiled" in live:
                comp, eager = live["compiled"], live["continuous"]
                entry["live_compiled_vs_eager"] = {
                    "mean": comp["mean_s"] / eager["mean_s"], "p95": comp["p95_s"] / eager["p95_s"],
                    "throughput": comp["throughput_rps"] / eager["throughput_rps"],
                }
            cont, peer = live["continuous"], live["peer"]
            entry["live_vs_peer"] = {
                "mean": cont["mean_s"] / peer["mean_s"],
                "p95": cont["p95_s"] / peer["p95_s"],
                "throughput": cont["throughput_rps"] / peer["throughput_rps"],
            }
            if "round_spread" in cont and "round_spread" in peer:
                # The machine's own drift in this run: the larger of the two servers' round-to-round spreads.
                entry["live_vs_peer"]["round_spread"] = {
                    m: max(cont["round_spread"][m], peer["round_spread"][m]) for m in ("mean", "p95")}
            if (during := machine_during(runs, "continuous", "peer")) is not None:
                entry["live_vs_peer"]["machine"] = during
            if solo_diff is None:
                solo_diff = isolated(partial(solo_vs_mixed, runner, results, cfg))
        loads_out.append(entry)
    saturated = poisson_trace(3.0 * cap, cfg.replay_requests, seed=cfg.seed, schedulers=mix)

    def at(load: float) -> dict[str, Any]:
        return next(e for e in loads_out if e["load"] == load)["replay"]

    r09, r11 = at(0.9), at(1.1)
    sat_fifo = replay_fifo(saturated, table)
    sat_cont = replay_engine(saturated, table, continuous, rows, cfg.slo_scale, shape)
    limit = batching_limit_rps(table, STEP_MIX, cfg.max_batch, rows)
    out = {
        "benchmark": "engine",
        "model": cfg.model,
        "family": model.family,
        "device": model.backend.name,
        "dtype": model.backend.dtype,
        "size": f"{cfg.size}x{cfg.size}",
        "max_batch": cfg.max_batch,
        "quick": quick,
        "noise": cfg.noise,
        "slo_scale": cfg.slo_scale,
        "cost_table": _table_json(table),
        "fifo_capacity_rps": cap,
        # What the live loads are relative to: `cap`, or under `--noise` fifo's capacity measured
        # live beside the noise (`fifo_probe_rps`).
        "live_capacity_rps": live_cap,
        "live_capacity_source": "fifo probe beside the noise" if cfg.noise else "cost table",
        "batching_limit_rps": limit,
        "loads": loads_out,
        "ratios": {
            "continuous_vs_fifo_mean_latency_at_0.9": r09["continuous"]["mean_s"] / r09["fifo"]["mean_s"],
            "continuous_vs_static_mean_latency_at_0.9": r09["continuous"]["mean_s"] / r09["static"]["mean_s"],
            "continuous_vs_static_p95_at_0.9": r09["continuous"]["p95_s"] / r09["static"]["p95_s"],
            "continuous_vs_fifo_throughput_at_1.1": r11["continuous"]["throughput_rps"] / r11["fifo"]["throughput_rps"],
            # Offered load 1.1 caps the ratio above at ~1.1; this is the capacity ratio at saturation (3x).
            "continuous_vs_fifo_throughput_saturated": sat_cont["throughput_rps"] / sat_fifo["throughput_rps"],
            # What full batches could serve at best, encode and decode included (see `batching_limit_rps`).
            "continuous_saturated_vs_batching_limit": sat_cont["throughput_rps"] / limit,
        },
        # Live, continuous / peer: mean and p95 should be <= 1, throughput >= 1 at loads 1.2 and 2.0.
        "live_vs_peer": {str(e["load"]): e["live_vs_peer"] for e in loads_out if "live_vs_peer" in e},
        "solo_vs_mixed_max_rel_diff": solo_diff,
        "wall_s": time.monotonic() - t_start,
    }
    if compile_info is not None and compiled_table is not None:
        compile_info["step_s_by_unet_rows"] = {str(k): v for k, v in sorted(compiled_table.step_s_by_rows.items())}
        out["compile"] = compile_info
        out["live_compiled_vs_eager"] = {str(e["load"]): e["live_compiled_vs_eager"] for e in loads_out
                                         if "live_compiled_vs_eager" in e}
    return out


def _table_json(table: CostTable) -> dict[str, Any]:
    return {
        "step_s_by_unet_rows": {str(k): v for k, v in sorted(table.step_s_by_rows.items())},
        "encode_s": table.encode_s,
        "decode_s": table.decode_s,
        "fifo_step_s": table.fifo_step_s,
        "fifo_overhead_s": table.fifo_overhead_s,
    }


def _compiled_setup(model: LoadedModel, runner: ModelRunner, cfg: BenchConfig, quick: bool,
                    log: Any) -> tuple[ModelRunner, CostTable, dict[str, Any]]:
    """The same backbone with its denoiser compiled per row bucket, warmed up, and its own cost table."""
    from stepfleet.serving.compiled.buckets import RowBuckets, ShapeBuckets, default_rows
    from stepfleet.serving.compiled.denoiser import (
        CompiledDenoiser,
        CompileOptions,
        dynamo_counters,
    )
    from stepfleet.serving.runner import ModelRunner

    rows = RowBuckets(default_rows(cfg.max_batch, rows_per_image_of(runner, cfg)))
    shape = runner.latent_shape(cfg.size, cfg.size)
    compiled = CompiledDenoiser(runner.backbone, ShapeBuckets(rows=rows, shapes=(shape,), sizes=((cfg.size, cfg.size),)),
                                CompileOptions(backend=cfg.compile_backend))
    log(f"compiling {len(rows.rows)} row buckets {rows.rows} ({compiled.backend}, mode {compiled.mode}) ...")
    stats = compiled.warm_up({shape: compiled.conditioning_rows(cfg.size, cfg.size)})
    compiled_runner = ModelRunner(runner.backbone, compiled=compiled)
    log("measuring compiled step costs ...")
    table = measure_costs(model, compiled_runner, cfg, quick)
    info = {"backend": compiled.backend, "mode": compiled.mode, "row_buckets": list(rows.rows),
            "compile_s_by_bucket": stats.compile_seconds, "graphs": dynamo_counters()["unique_graphs"]}
    return compiled_runner, table, info


def batching_limit_rps(table: CostTable, step_mix: Sequence[int], max_batch: int, rows_per_image: int) -> float:
    """Requests per second with every step at the measured curve's cheapest batch: the device's batching limit.

    The cheapest step per image is usually the full batch, but on a CPU a smaller one can be
    (6 UNet rows cost less per row than 8 in one run). Encoding and decoding are charged per
    request, serialised with the steps, as the replay charges them; a policy's saturated
    throughput is judged against this.
    """
    per_image = min(table.step_s_by_rows[r] / (r // rows_per_image) for r in table.step_s_by_rows
                    if rows_per_image <= r <= max_batch * rows_per_image)
    mean_steps = sum(step_mix) / len(step_mix)
    return 1.0 / (mean_steps * per_image + table.encode_s + table.decode_s)


def summary(result: dict[str, Any]) -> str:
    lines = [f"engine benchmark: {result['model']} on {result['device']} ({result['dtype']}), {result['size']}, "
             f"max batch {result['max_batch']}, fifo capacity {result['fifo_capacity_rps']:.3f} req/s, "
             f"batching limit {result['batching_limit_rps']:.3f} req/s"
             + (f", noise (live loads relative to {result['live_capacity_rps']:.3f} req/s)" if result['noise'] else "")]
    for e in result["loads"]:
        for kind in ("live", "replay"):
            if kind not in e:
                continue
            cells = "  ".join(
                f"{p}: mean {e[kind][p]['mean_s']:.2f}s p95 {e[kind][p]['p95_s']:.2f}s "
                f"thr {e[kind][p]['throughput_rps']:.3f}/s" for p in POLICIES if p in e[kind])
            lines.append(f"  load {e['load']:.1f} {kind:6s} {cells}")
            if kind == "live":
                b = e["live"]["continuous"]["batching"]
                lines.append(f"           continuous ended in {b['mode']} sizing, cap {b['cap_images']} images; "
                             f"vs peer: mean {e['live_vs_peer']['mean']:.2f}x p95 {e['live_vs_peer']['p95']:.2f}x "
                             f"thr {e['live_vs_peer']['throughput']:.2f}x"
                             + (f" (same server, round to round: mean {spread['mean']:.2f}x p95 {spread['p95']:.2f}x)"
                                if (spread := e["live_vs_peer"].get("round_spread")) else "")
                             + (f"; machine during continuous / peer rounds {m['continuous_vs_peer']:.2f}x"
                                if (m := e["live_vs_peer"].get("machine")) else ""))
    for load, r in result.get("live_compiled_vs_eager", {}).items():
        lines.append(f"  compiled / eager continuous at {load}: mean {r['mean']:.2f}x p95 {r['p95']:.2f}x "
                     f"thr {r['throughput']:.2f}x")
    for k, v in result["ratios"].items():
        lines.append(f"  {k}: {v:.3f}")
    lines.append(f"  solo_vs_mixed_max_rel_diff: {result['solo_vs_mixed_max_rel_diff']}")
    lines.append(f"  wall: {result['wall_s']:.0f}s")
    return "\n".join(lines)
