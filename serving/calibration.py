"""Timing the step-cost curve on purpose: how a step's duration grows with the batch.

Why measure instead of only learning online: the engine sizes batches by comparing
per-row costs of different batch sizes, and online samples of sizes it rarely runs are
few and stale. A curve timed deliberately — every size the same number of times,
round-robin, keeping each one's fastest run — compares like with like. The worker does
this once after its warm-up request; the benchmarks use the same routine for their cost
tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from stepfleet.serving.contracts import Runner
from stepfleet.serving.params import GenerationParams

S = TypeVar("S")


def interleaved_min(fns: dict[Any, Callable[[], Any]], reps: int, warmup: int = 0) -> dict[Any, float]:
    """Time each callable `reps` times, round-robin, and keep each one's fastest run.

    Round-robin spreads a slow minute over all candidates alike, and the minimum is the
    figure least disturbed by other processes on a shared machine. `warmup` untimed rounds go
    first (a table timed right after loading the model once had the engine's one-image step 25 %
    above the plain pipeline's, against 0.95-1.05 in the rounds after).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def step_curve(
    runner: Runner[S],
    width: int,
    height: int,
    guidance_scale: float,
    max_images: int,
    reps: int = 3,
    schedulers: Sequence[str | None] = (None,),  # None: the model's own (DDIM would not fit SD3 or Flux)
) -> dict[int, float]:
    """Seconds of one denoising step by UNet rows, for batches of 1..`max_images` one-image requests.

    Run it on the thread that runs the step loop: on a CPU, torch on another thread is
    slower (see `serving.auxwork`).
    """
    steps = curve_steps(runner, width, height, guidance_scale, max_images, reps, schedulers)
    return interleaved_min(steps, reps)


def curve_steps(
    runner: Runner[S],
    width: int,
    height: int,
    guidance_scale: float,
    max_images: int,
    reps: int,
    schedulers: Sequence[str | None] = (None,),  # None: the model's own (DDIM would not fit SD3 or Flux)
) -> dict[int, Callable[[], Any]]:
    """UNet rows -> one step of a warmed batch of that many one-image requests (good for `reps` calls).

    Batches are built as the engine runs them (one request per image, schedulers cycling
    through `schedulers`, since per-request scheduler work is part of a step). Callers that
    time other work too interleave it with these in one `interleaved_min`, so drift hits both.
    """
    batches: dict[int, list[S]] = {}
    for k in range(1, max_images + 1):
        prepared = [
            runner.prepare(
                GenerationParams(prompt=f"calibrate {i}", width=width, height=height, num_inference_steps=reps + 100,
                                 scheduler=schedulers[i % len(schedulers)], guidance_scale=guidance_scale),
                seed=i,
            )
            for i in range(k)
        ]
        batch = [p.state for p in prepared]
        runner.step(batch)  # the first call of a size pays for allocation
        # Rows as the runner counts them (a family without guidance rows, Flux, has one per image).
        batches[sum(p.unet_rows for p in prepared)] = batch
    return {rows: partial(runner.step, batch) for rows, batch in batches.items()}
