"""The denoiser call compiled once per shape bucket, behind the backbone seam.

Why a wrapper around `Backbone.denoise` rather than a compiled module: every family's
`denoise` already turns (sample, timestep, conditioning rows) into the denoiser's own
arguments (SDXL's added conditions, Flux's packing and position ids), so compiling that one
function covers every family with one code path, and the runner stays family-agnostic.

Each call pads its rows up to the row bucket (`buckets.RowBuckets`), runs the graph compiled
for that (rows, latent shape) with static shapes (`dynamic=False`: a bucket is exactly one
graph), and returns the real rows. Padding rows are copies of the last row (sample, timestep
and conditioning): every family's denoiser treats rows independently (per-sample norms and
attention), so padding changes no real row beyond float rounding.

Steps whose denoiser an add-on changes (LoRA hooks, masked edits, ControlNet residuals) run the
eager module instead (`eager`): hooks added after compilation are not in the graph (dynamo
does not guard on module hooks), and residual lists would be new graph inputs. Such steps are
counted by reason, so a pool whose traffic mostly takes the eager path shows it.

Warm-up compiles every bucket before the worker reports ready (`warm_up`); the compile
counters come from torch itself (`torch._dynamo.utils.counters`), which is what the
no-recompilation test asserts on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from stepfleet.serving.backbones.base import Backbone, DenoiserExtras
from stepfleet.serving.compiled.buckets import ShapeBuckets
from stepfleet.serving.params import GenerationParams, InvalidParam

log = logging.getLogger(__name__)


class CompileFailed(RuntimeError):
    """A bucket's graph did not compile at warm-up: the worker stays un-ready with this error."""


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: torch.compile's backend and mode, resolved for the device."""

    backend: str = "auto"  # inductor, aot_eager, cudagraphs, openxla; auto picks by device
    mode: str = "auto"  # default, reduce-overhead, max-autotune-no-cudagraphs; auto picks by device

    def resolved(self, device: torch.device) -> tuple[str, str | None]:
        """(backend, mode) for `device`: CUDA graphs on CUDA (reduce-overhead), XLA's own backend on XLA."""
        backend = self.backend
        if backend == "auto":
            backend = "openxla" if device.type in ("xla", "neuron") else "inductor"
        if backend != "inductor":
            return backend, None
        mode = self.mode
        if mode == "auto":
            mode = "reduce-overhead" if device.type == "cuda" else "default"
        if mode == "reduce-overhead" and device.type != "cuda":
            raise CompileFailed(f"compile mode reduce-overhead (CUDA graphs) needs a CUDA device, not {device.type}")
        return backend, mode


@dataclass
class CompileStats:
    """What the compiled path did: read by `/readyz` (progress) and `/metrics` (at scrape time)."""

    buckets_total: int = 0
    buckets_done: int = 0
    compile_seconds: dict[str, float] = field(default_factory=dict)  # bucket label -> seconds
    compiled_calls: int = 0
    eager_calls: dict[str, int] = field(default_factory=dict)  # reason -> steps
    error: str | None = None

    def snapshot(self) -> CompileStats:
        return CompileStats(self.buckets_total, self.buckets_done, dict(self.compile_seconds),
                            self.compiled_calls, dict(self.eager_calls), self.error)


def dynamo_counters() -> dict[str, int]:
    """Torch's own compile counters: graphs compiled, recompiles, FX-graph cache hits/misses."""
    from torch._dynamo.utils import counters

    stats, inductor = counters["stats"], counters["inductor"]
    return {
        "unique_graphs": int(stats.get("unique_graphs", 0)),
        "calls_captured": int(stats.get("calls_captured", 0)),
        "fxgraph_cache_hit": int(inductor.get("fxgraph_cache_hit", 0)),
        "fxgraph_cache_miss": int(inductor.get("fxgraph_cache_miss", 0)),
    }


def bucket_label(rows: int, shape: tuple[int, ...]) -> str:
    return f"{rows}x" + "x".join(str(d) for d in shape)


class CompiledDenoiser:
    """`backbone.denoise` compiled per (rows, latent shape) bucket, with padding and an eager path."""

    def __init__(self, backbone: Backbone, buckets: ShapeBuckets, options: CompileOptions | None = None) -> None:
        self.backbone = backbone
        self.buckets = buckets
        self.options = options or CompileOptions()
        self.backend, self.mode = self.options.resolved(backbone.device)
        self.stats = CompileStats(buckets_total=buckets.count)
        self._lock = threading.Lock()  # stats are written on the step loop, read by HTTP handlers
        self._cuda_graphs = backbone.device.type == "cuda" and (self.mode == "reduce-overhead"
                                                                 or self.backend == "cudagraphs")
        _raise_recompile_limit(buckets.count)
        self._compiled: Callable[..., torch.Tensor] = torch.compile(
            self._plain, backend=self.backend, mode=self.mode, fullgraph=True, dynamic=False)

    # -- calls -------------------------------------------------------------------------
    def _plain(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone.denoise(sample, timestep, cond)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse (400) a latent shape that no bucket was compiled for: never a recompile."""
        if not self.buckets.allows(shape):
            raise InvalidParam("size", f"this worker runs compiled graphs for {self.buckets.describe_sizes()} only")

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
                 extras: DenoiserExtras | None = None, eager_reason: str | None = None) -> torch.Tensor:
        """One batched denoiser call: compiled in its bucket, or eager (`eager_reason`, or extras given)."""
        rows = int(sample.shape[0])
        bucket = self.buckets.rows.pad(rows)
        shape = tuple(int(d) for d in sample.shape[1:])
        reason = eager_reason or ("extras" if extras else None)
        if reason is None and (bucket is None or not self.buckets.allows(shape)):
            reason = "outside buckets"
        if reason is not None:
            with self._lock:
                self.stats.eager_calls[reason] = self.stats.eager_calls.get(reason, 0) + 1
            return self.backbone.denoise(sample, timestep, cond, extras) if extras else \
                self.backbone.denoise(sample, timestep, cond)
        assert bucket is not None
        out = self._run(pad_rows(sample, bucket), pad_rows(timestep, bucket),
                        {k: pad_rows(v, bucket) for k, v in cond.items()})
        with self._lock:
            self.stats.compiled_calls += 1
        return out[:rows].clone() if self._cuda_graphs or bucket != rows else out

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._cuda_graphs:  # a new step: earlier graph outputs may be overwritten (we cloned ours)
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(sample, timestep, dict(cond))

    # -- warm-up ----------------------------------------------------------------------
    def warm_up(self, sizes_cond: Mapping[tuple[int, ...], Mapping[str, torch.Tensor]],
                progress: Callable[[CompileStats], None] | None = None, calls: int = 3) -> CompileStats:
        """Compile every bucket: `sizes_cond` maps each latent shape to one row of conditioning.

        Each bucket is called `calls` times (CUDA graph trees record on a later call than the
        first); a failure raises `CompileFailed` naming the bucket.
        """
        dtype = next(iter(next(iter(sizes_cond.values())).values())).dtype
        device = self.backbone.device
        with torch.inference_mode():  # as the runner steps: a grad-mode change would recompile
            for shape, row in sizes_cond.items():
                for rows in self.buckets.rows.rows:
                    label = bucket_label(rows, shape)
                    start = time.perf_counter()
                    sample = torch.zeros((rows, *shape), device=device, dtype=dtype)
                    timestep = torch.full((rows,), 500.0, device=device)
                    # clone: inference tensors like the runner's (a plain tensor's dispatch keys would
                    # make the first real step recompile)
                    cond = {k: v[:1].expand(rows, *v.shape[1:]).clone() for k, v in row.items()}
                    try:
                        for _ in range(calls):
                            self._run(sample, timestep, cond)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                    except Exception as exc:
                        with self._lock:
                            self.stats.error = f"bucket {label}: {type(exc).__name__}: {exc}"
                        raise CompileFailed(self.stats.error) from exc
                    seconds = time.perf_counter() - start
                    with self._lock:
                        self.stats.compile_seconds[label] = seconds
                        self.stats.buckets_done += 1
                        snap = self.stats.snapshot()
                    log.info("compiled bucket %s (%s/%s) in %.1f s", label, snap.buckets_done, snap.buckets_total,
                             seconds)
                    if progress is not None:
                        progress(snap)
        return self.stats.snapshot()

    def conditioning_rows(self, width: int, height: int) -> dict[str, torch.Tensor]:
        """One unguided row of real conditioning for a size (SDXL's size ids depend on it)."""
        cond = self.backbone.encode_prompt(GenerationParams(prompt="warm-up", width=width, height=height), False)
        return dict(cond.positive)

    def snapshot(self) -> CompileStats:
        with self._lock:
            return self.stats.snapshot()


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with copies of its last row appended up to `rows` (finite values the denoiser has seen)."""
    have = int(x.shape[0])
    if have == rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - have, *x.shape[1:])])


def _raise_recompile_limit(graphs: int) -> None:
    """Let one function hold a graph per bucket (dynamo's default limit is 8)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < graphs + 2:
            setattr(dynamo_config, name, graphs + 2)
