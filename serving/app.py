"""The worker's app factory: OpenAI-compatible image endpoints in front of the step-level engine.

`create_app(settings, engine=None, edits=None)` wires the routers of `serving.http`; tests
pass a small engine (and, for edits, the `EditExtension` its runner was built with), the
CLI passes none and the model loads in the `lifespan`, on a thread: model → backbone → the
edits extension (skipped, with a warning, when the model cannot do masked compute) →
runner → engine → template service. The server listens meanwhile (liveness `/healthz` is
fine while a big model loads for minutes) and reports ready on `/readyz` only after one
warm-up request ran and the step-cost curve was timed. A load that fails — a
`FamilyMismatch` between the settings and the checkpoint, missing weights — is reported on
`/readyz` as `{"status": "failed", "error": "FamilyMismatch: ..."}`.

With a worker token (`--worker-token-file`, or `$STEPFLEET_WORKER_TOKEN`) every request but
the probes, the scrape and the schema must carry it (`serving.worker_auth`): in a fleet only
the router talks to a worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import ExitStack, asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.errors import install_error_handlers
from stepfleet.serving.http import adapters as adapter_routes
from stepfleet.serving.http import controlnets as controlnet_routes
from stepfleet.serving.http import edits as edit_routes
from stepfleet.serving.http import generations, health, metrics, templates, videos
from stepfleet.serving.http.openapi import document_limits
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.uploads import set_pixel_limit
from stepfleet.serving.middleware import RequestIdMiddleware
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.settings import WorkerSettings
from stepfleet.serving.worker_auth import TokenFile, WorkerAuthMiddleware

if TYPE_CHECKING:
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.edits.extension import EditExtension
    from stepfleet.serving.edits.service import TemplateService
    from stepfleet.serving.videos.service import VideoService

log = logging.getLogger(__name__)

#: One router per concern, in the order /openapi.json lists them.
ROUTERS = (generations.router, edit_routes.router, templates.router, adapter_routes.router, controlnet_routes.router,
           videos.router, health.router, metrics.router)


def create_app(
    settings: WorkerSettings | None = None, engine: Engine | None = None, edits: EditExtension | None = None,
    adapters: AdapterRegistry | None = None,
) -> FastAPI:
    """The worker app; with `engine`, serve it (edits only when `edits`, the extension its runner
    has, is given too), else load the model the settings name."""
    if edits is not None and engine is None:
        raise ValueError("edits= is the extension of a given engine's runner; pass engine= too")
    settings = settings or WorkerSettings()
    state = WorkerState.create(settings, engine.config.max_batch if engine is not None else settings.max_batch)
    if engine is not None:
        state.use(engine, _template_service(engine, edits), engine.runner.default_size)
        state.adapters = adapters  # the registry of the given runner's LoraExtension, if any
    owned = ExitStack()  # what this app loaded and closes at shutdown
    state.videos = _video_service(settings, owned)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_start, args=(state, owned), name="stepfleet-loader", daemon=True)
        loader.start()
        with owned:
            yield
            state.ready.clear()
            loader.join(timeout=1.0)
            if state.engine is not None:
                # uvicorn has already waited for in-flight HTTP requests; drain what is left.
                await asyncio.to_thread(state.engine.stop, True, settings.graceful_shutdown_s)

    app = FastAPI(title="stepfleet worker", version="0.1.0", lifespan=lifespan)
    app.state.worker = state
    install_error_handlers(app, on_invalid=state.count_invalid)
    tokens = TokenFile(settings.worker_token_file)
    if tokens.enabled:
        app.add_middleware(WorkerAuthMiddleware, tokens=tokens)
    app.add_middleware(RequestIdMiddleware, extra_headers=state.load_headers)  # outermost: ids on 401s too
    for router in ROUTERS:
        app.include_router(router)
    set_pixel_limit(settings.max_image_size)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_limits(FastAPI.openapi(app), state.limits)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _video_service(settings: WorkerSettings, owned: ExitStack) -> VideoService:
    """Video jobs in `--video-dir` (kept across restarts), else in a temporary directory removed at exit."""
    import shutil
    import tempfile
    from pathlib import Path

    from stepfleet.serving.videos.service import VideoService

    if settings.video_dir:
        directory = Path(settings.video_dir)
    else:
        directory = Path(tempfile.mkdtemp(prefix="stepfleet-videos-"))
        owned.callback(shutil.rmtree, directory, True)
    service = VideoService(directory, max_jobs=settings.video_max_jobs, ttl_s=settings.video_ttl_s,
                           content_bytes=settings.video_content_bytes)
    owned.callback(service.close)
    return service


def _template_service(engine: Engine, edits: EditExtension | None) -> TemplateService | None:
    if edits is None:
        return None
    from stepfleet.serving.edits.service import TemplateService

    return TemplateService(engine, edits)


def _start(state: WorkerState, owned: ExitStack) -> None:
    """Load the model (unless an engine was given), start the loop, warm up, then report ready."""
    s = state.settings
    try:
        if state.engine is None:
            _load(state, owned)
        assert state.engine is not None
        state.engine.start()
        if state.compiled is not None:  # every bucket compiles before the first request (and /readyz)
            from stepfleet.serving.compiled.setup import warm_up

            compiled = state.compiled
            stats = state.engine.call_on_loop(lambda: warm_up(compiled)).result()
            log.info("compiled %d buckets in %.1f s", stats.buckets_done, sum(stats.compile_seconds.values()))
        if s.warmup:
            w, h = state.default_size
            state.engine.warmup(GenerationParams(prompt="warm-up", width=w, height=h, num_inference_steps=1,
                                                 guidance_scale=s.default_guidance_scale, seed=0))
            curve = state.engine.calibrate(w, h, s.default_guidance_scale)
            log.info("step cost by UNet rows at %dx%d: %s", w, h,
                     ", ".join(f"{rows}: {sec * 1000:.1f} ms" for rows, sec in sorted(curve.items())))
        state.mark_ready()
        log.info("worker ready: model %s, pool %s", s.public_model_name(), s.pool)
    except Exception as exc:  # reported on /readyz; the process stays up for diagnosis
        log.exception("model failed to load")
        state.load_error = f"{type(exc).__name__}: {exc}"


def _load(state: WorkerState, owned: ExitStack) -> None:
    """Model → backbone → edits extension → runner → engine → template service, as the settings say."""
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.edits.cache import TemplateCache
    from stepfleet.serving.edits.extension import EditExtension
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    s = state.settings
    if s.compile and s.compile_cache:  # before anything compiles
        from stepfleet.serving.compiled.cache import configure_compile_cache

        configure_compile_cache(s.compile_cache)
    model = load_model(s.model, device=s.device, dtype=s.dtype, local_files_only=s.local_files_only,
                       revision=s.revision, family=s.family)
    backbone = load_backbone(model)
    cache = owned.enter_context(TemplateCache(s.template_cache_bytes, disk_bytes=s.template_disk_bytes,
                                              disk_dir=s.template_dir))
    edits: EditExtension | None = None
    try:
        from stepfleet.serving.edits.crop_decode import CropDecode

        edits = EditExtension(backbone, cache, halo=s.edit_halo,
                              crop=CropDecode(margin=s.edit_crop_margin, max_fraction=s.edit_crop_max_fraction),
                              conv_halo=s.edit_conv_halo)
        owned.callback(edits.close)
    except NotImplementedError as exc:  # a family or denoiser that masked compute does not know
        log.warning("edits disabled: %s", exc)
    from stepfleet.serving.adapters.worker import build_adapters

    adapters = build_adapters(s, backbone, state.metrics.registry)
    if adapters is not None:
        owned.callback(adapters[0].close)
        owned.callback(adapters[1].close)
    lora = [adapters[1]] if adapters is not None else []
    from stepfleet.serving.controlnet.worker import build_controlnets

    control = build_controlnets(s, backbone)
    if control is not None:
        owned.callback(control.close)
    from stepfleet.serving.compiled.setup import compiled_denoiser

    compiled = compiled_denoiser(s, backbone)
    runner = ModelRunner(backbone, extensions=([edits] if edits is not None else []) + lora
                         + ([control] if control is not None else []), compiled=compiled)
    config = EngineConfig(max_batch=s.max_batch, max_queue=s.max_queue, preemption=s.preemption, policy=s.policy,
                          slo_scale=s.slo_scale, aux=s.aux, slo_image_s=s.slo_image_s, slo_video_s=s.slo_video_s,
                          row_buckets=compiled.buckets.rows.rows if compiled is not None else None)
    if compiled is not None:
        from stepfleet.serving.compiled.metrics import CompileMetrics

        state.compiled = compiled
        state.compile_metrics = CompileMetrics(s.pool, state.metrics.registry)
    engine = Engine(runner, config)
    default_size = runner.default_size
    if compiled is not None and default_size not in compiled.buckets.sizes:  # `size: "auto"`, the warm-up
        default_size = compiled.buckets.sizes[0]
    state.use(engine, _template_service(engine, edits), default_size)
    state.adapters = adapters[0] if adapters is not None else None
