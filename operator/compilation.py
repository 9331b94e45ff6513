"""Compiled pools as the operator sees them: the worker's compile flags, warm-up time, bucket checks.

Why a module of its own. A compiled worker (issue 20, `serving/compiled/`) spends its warm-up
compiling one graph per shape bucket before `/readyz` turns ready: minutes on a GPU with a
cold cache, more on Neuron. Three parts of the operator must budget for that time, and they
must agree on one number per pool: the startup probe (so the kubelet does not kill a pod that
is compiling), the readiness timeout (so the control loop does not count a compiling pool as
short) and the provisioning time the policy plans ahead with. That number, and the checks
that keep a bucket specification the worker would refuse out of the cluster, live here.

Warm-up defaults are per bucket, by accelerator, times the pool's buckets (rows x sizes),
because compile time is per graph. The per-bucket figures are the cold-cache times measured
for issue 20, rounded up: an H200 with inductor and CUDA graphs took 44-54 s per SD 1.5
UNet bucket at 512x512 and 107 s per SDXL UNet bucket at 1024x1024 (19 s when inductor's
FX-graph cache already held it); 2 CPU cores took 39-72 s per bucket of the tiny test UNet.
Neuron and TPU were not measured (no such hardware here): their figures are estimates from
the XLA compilers' minutes-per-graph behaviour, and users are expected to set
`compile.warmupSeconds` from their own first rollout.

Pure: reads the parsed spec, no I/O.
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict

from stepfleet.operator.models import DiffusionServiceSpec, PoolSpec
from stepfleet.serving.compiled.buckets import default_rows
from stepfleet.serving.settings import WorkerSettings

#: Where a worker's persistent compile caches live when `spec.serving.compileCache` names a PVC.
COMPILE_CACHE_MOUNT = "/var/cache/stepfleet/compile"
#: The pod volume that carries the compile-cache PVC.
COMPILE_CACHE_VOLUME = "compile-cache"

#: Cold-cache warm-up seconds per compiled bucket, by accelerator type (see the module docstring).
WARMUP_PER_BUCKET_S: dict[str, float] = {
    "nvidia-gpu": 120.0,  # measured: SDXL UNet 1024^2 107 s, SD 1.5 UNet 512^2 44-54 s (H200, inductor)
    "aws-neuron": 300.0,  # estimate: neuronx-cc compiles of a UNet take minutes per shape
    "google-tpu": 180.0,  # estimate: XLA graph compiles, between CUDA and Neuron
    "cpu": 75.0,  # measured: tiny test UNet 39-72 s per bucket on 2 cores
}

#: Time a worker may take to load the model before it compiles: the uncompiled startup allowance
#: (`children.workers`: 60 probes x 10 s), kept so that compiling never shortens it.
MODEL_LOAD_ALLOWANCE_S = 600.0

#: Families whose denoiser runs one row per image (no classifier-free guidance rows); the
#: data plane's `Capabilities.guidance` is False for them (`serving/backbones/flux.py`).
UNGUIDED_FAMILIES = frozenset({"flux"})

#: The worker's largest image side when the operator does not set `--max-image-size` (it does not).
WORKER_MAX_IMAGE_SIZE: int = WorkerSettings.model_fields["max_image_size"].default


class CompileFields(TypedDict, total=False):
    """The `WorkerSettings` fields a compiled pool sets (empty when compile is off)."""

    compile: bool
    compile_backend: Literal["auto", "inductor", "aot_eager", "cudagraphs", "openxla"]
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]
    bucket_rows: str
    bucket_sizes: str
    compile_cache: str


#: Compile settings written into the worker's command even where they equal the worker's defaults
#: (as `children.workers.EXPLICIT_SETTINGS`): a later change of a worker default must not change
#: what a compiled pool compiles.
EXPLICIT_COMPILE_SETTINGS = ("compile", "compile_backend", "compile_mode")


def enabled(spec: DiffusionServiceSpec) -> bool:
    return spec.serving.compile.enabled


def rows_per_image(spec: DiffusionServiceSpec) -> int:
    """Denoiser rows of one image: 2 with guidance (a negative-prompt row), 1 for unguided families."""
    return 1 if spec.model.family in UNGUIDED_FAMILIES else 2


def max_batch(spec: DiffusionServiceSpec, pool: PoolSpec) -> int:
    """The pool's `--max-batch` (its own override, else the service's)."""
    return pool.max_batch or spec.serving.max_batch


def bucket_rows(spec: DiffusionServiceSpec, pool: PoolSpec) -> tuple[int, ...]:
    """The row buckets a pool's workers compile: the spec's, or the worker's own default rule."""
    buckets = spec.serving.buckets
    if buckets is not None and buckets.rows:
        return tuple(buckets.rows)
    return default_rows(max_batch(spec, pool), rows_per_image(spec))


def bucket_count(spec: DiffusionServiceSpec, pool: PoolSpec) -> int:
    """Graphs one worker compiles during warm-up: row buckets x sizes (default: one size)."""
    buckets = spec.serving.buckets
    sizes = len(buckets.sizes) if buckets is not None and buckets.sizes else 1
    return len(bucket_rows(spec, pool)) * sizes


def warmup_seconds(spec: DiffusionServiceSpec, pool: PoolSpec) -> float:
    """Seconds one replica of the pool spends compiling before it is ready (0 without compile)."""
    if not enabled(spec):
        return 0.0
    given = spec.serving.compile.warmup_seconds
    if given is not None:
        return float(given)
    return WARMUP_PER_BUCKET_S[pool.accelerator.type] * bucket_count(spec, pool)


def readiness_timeouts(spec: DiffusionServiceSpec) -> dict[str, float]:
    """pool -> how long a placed pod may stay un-ready before the pool counts as short.

    `controlLoop.readinessTimeoutSeconds` covers a model load; a compiled pool adds its
    warm-up. 0 keeps the signal off for every pool, as it does without compile.
    """
    base = spec.control_loop.readiness_timeout_seconds
    return {p.name: (base + warmup_seconds(spec, p)) if base > 0 else 0.0 for p in spec.pools}


def provisioning_seconds(spec: DiffusionServiceSpec, pool: PoolSpec) -> float:
    """Seconds from asking for a replica to it serving: node and model load, plus the warm-up."""
    return spec.control_loop.provisioning_seconds + warmup_seconds(spec, pool)


def startup_failures(spec: DiffusionServiceSpec, pool: PoolSpec, period_s: int) -> int:
    """Startup-probe failures allowed so that `failures x period` covers model load and warm-up."""
    return math.ceil((MODEL_LOAD_ALLOWANCE_S + warmup_seconds(spec, pool)) / period_s)


def worker_fields(spec: DiffusionServiceSpec) -> CompileFields:
    """The compile flags of every pool's workers (none when compile is off).

    Empty bucket lists are left to the worker, which derives them from `--max-batch` and the
    model's default size: the data plane's rule stays in one place.
    """
    if not enabled(spec):
        return {}
    settings = spec.serving
    fields: CompileFields = {
        "compile": True,
        "compile_backend": settings.compile.backend,
        "compile_mode": settings.compile.mode,
    }
    if settings.buckets is not None and settings.buckets.rows:
        fields["bucket_rows"] = ",".join(str(r) for r in settings.buckets.rows)
    if settings.buckets is not None and settings.buckets.sizes:
        fields["bucket_sizes"] = ",".join(settings.buckets.sizes)
    if settings.compile_cache is not None:
        fields["compile_cache"] = COMPILE_CACHE_MOUNT
    return fields


def bucket_problems(spec: DiffusionServiceSpec) -> list[tuple[str, str]]:
    """(field, reason) for bucket specifications a compiled worker would refuse at warm-up.

    Checked even with compile off, so that turning compile on later cannot fail on a spec
    that was accepted: the largest row bucket must hold a full batch of every pool (a guided
    image takes two rows), and no size may exceed the worker's largest image side.
    """
    buckets = spec.serving.buckets
    if buckets is None:
        return []
    problems: list[tuple[str, str]] = []
    if buckets.rows:
        per_image = rows_per_image(spec)
        for pool in spec.pools:
            need = max_batch(spec, pool) * per_image
            if buckets.rows[-1] < need:
                where = f"pool {pool.name}'s maxBatch" if pool.max_batch else "serving.maxBatch"
                problems.append(("spec.serving.buckets.rows", (
                    f"the largest row bucket ({buckets.rows[-1]}) must hold a full batch: {where} "
                    f"{max_batch(spec, pool)} x {per_image} rows per image = {need}")))
    for size in buckets.sizes:
        width, height = (int(side) for side in size.split("x"))
        if max(width, height) > WORKER_MAX_IMAGE_SIZE:
            problems.append(("spec.serving.buckets.sizes",
                             f"{size} exceeds the workers' largest image side ({WORKER_MAX_IMAGE_SIZE})"))
    return problems
