"""A compiled worker from its settings: buckets, the compiled denoiser, the cache, the warm-up.

The worker (`serving.app`) calls `compiled_denoiser` after the backbone loads and
`warm_up` on the step loop before it reports ready; a bad bucket specification or a bucket
that fails to compile leaves the worker un-ready with the error on `/readyz` (which the
operator copies to the DiffusionService status).
"""

from __future__ import annotations

from collections.abc import Callable

from stepfleet.serving.backbones.base import Backbone, MakesVideo
from stepfleet.serving.compiled.buckets import (
    BucketError,
    RowBuckets,
    ShapeBuckets,
    default_rows,
    parse_rows,
    parse_sizes,
)
from stepfleet.serving.compiled.denoiser import CompiledDenoiser, CompileOptions, CompileStats
from stepfleet.serving.settings import WorkerSettings


def rows_per_image(backbone: Backbone) -> int:
    """Denoiser rows of one guided image: 2 with classifier-free guidance rows, 1 without (Flux)."""
    return 2 if backbone.capabilities.guidance else 1


def shape_buckets(settings: WorkerSettings, backbone: Backbone) -> ShapeBuckets:
    """The settings' buckets, checked against the batch they must hold."""
    per_image = rows_per_image(backbone)
    rows = RowBuckets(parse_rows(settings.bucket_rows) if settings.bucket_rows.strip()
                      else default_rows(settings.max_batch, per_image))
    need = settings.max_batch * per_image
    if rows.largest < need:
        raise BucketError(f"the largest row bucket ({rows.largest}) must hold a full batch: --max-batch "
                          f"{settings.max_batch} x {per_image} rows per image = {need}")
    sizes = parse_sizes(settings.bucket_sizes) if settings.bucket_sizes.strip() else (backbone.default_size,)
    for w, h in sizes:
        if max(w, h) > settings.max_image_size:
            raise BucketError(f"bucket size {w}x{h} exceeds --max-image-size {settings.max_image_size}")
    if isinstance(backbone, MakesVideo):  # a video family's images are one-frame clips
        shapes = tuple(backbone.video_latent_shape(w, h, 1) for w, h in sizes)
    else:
        shapes = tuple(backbone.latent_shape(w, h) for w, h in sizes)
    return ShapeBuckets(rows=rows, shapes=shapes, sizes=sizes)


def compiled_denoiser(settings: WorkerSettings, backbone: Backbone) -> CompiledDenoiser | None:
    """The compiled denoiser the settings ask for (None without `--compile`)."""
    if not settings.compile:
        return None
    options = CompileOptions(backend=settings.compile_backend, mode=settings.compile_mode)
    return CompiledDenoiser(backbone, shape_buckets(settings, backbone), options)


def warm_up(compiled: CompiledDenoiser, progress: Callable[[CompileStats], None] | None = None) -> CompileStats:
    """Compile every bucket (run it on the step loop's thread: it is where the graphs will run)."""
    conds = {shape: compiled.conditioning_rows(w, h)
             for shape, (w, h) in zip(compiled.buckets.shapes, compiled.buckets.sizes, strict=True)}
    return compiled.warm_up(conds, progress)
