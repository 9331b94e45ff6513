"""The worker's HTTP app: OpenAI-compatible image endpoints in front of the step-level engine.

`create_app(settings, engine=None)` wires everything; tests pass a small engine, the CLI
passes none and the model loads in the background at start-up. The server listens
immediately (liveness `/healthz` is fine while a big model loads for minutes) and reports
ready on `/readyz` only after the model is loaded and one warm-up request ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from stepfleet.serving.engine import Engine, EngineConfig, QueueFull, RequestCancelled, ShuttingDown
from stepfleet.serving.errors import APIError, install_error_handlers
from stepfleet.serving.images import to_b64
from stepfleet.serving.metrics import WorkerMetrics
from stepfleet.serving.middleware import RequestIdMiddleware
from stepfleet.serving.params import (
    GenerationParams,
    InvalidParam,
    Limits,
    Priority,
    parse_size,
    validate,
)
from stepfleet.serving.schemas import ImageGenerationRequest, ModelCard, ModelList
from stepfleet.serving.settings import WorkerSettings

log = logging.getLogger(__name__)

#: How often a waiting handler checks whether its client went away.
DISCONNECT_POLL_S = 0.2


class WorkerState:
    """What the handlers share: the engine once it exists, readiness, metrics."""

    def __init__(self, settings: WorkerSettings, engine: Engine | None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = WorkerMetrics(pool=settings.pool)
        if engine is not None:
            engine.observer = self.metrics
        self.ready = threading.Event()
        self.own_cache = None  # the template cache this worker made (closed at shutdown)
        self.load_error: str | None = None
        self.started = int(time.time())
        self.limits = Limits(
            max_image_size=settings.max_image_size, max_steps=settings.max_steps, max_images=settings.max_images
        )

    @property
    def default_size(self) -> tuple[int, int]:
        assert self.engine is not None
        model = getattr(self.engine.runner, "model", None)
        return model.default_size if model is not None else (256, 256)

    def start_engine(self) -> None:
        """Load the model (unless an engine was given), start the loop, warm up, then report ready."""
        try:
            if self.engine is None:
                from stepfleet.serving.loading import load_model
                from stepfleet.serving.runner import ModelRunner

                s = self.settings
                model = load_model(s.model, device=s.device, dtype=s.dtype, local_files_only=s.local_files_only,
                                   revision=s.revision)
                from stepfleet.serving.edits.cache import TemplateCache

                self.own_cache = TemplateCache(s.template_cache_bytes, disk_bytes=s.template_disk_bytes,
                                               disk_dir=s.template_dir)
                config = EngineConfig(max_batch=s.max_batch, max_queue=s.max_queue, preemption=s.preemption,
                                      policy=s.policy, slo_scale=s.slo_scale, aux=s.aux)
                try:
                    runner = ModelRunner(model, template_cache=self.own_cache)
                except NotImplementedError as exc:  # a UNet variant masked compute does not know
                    log.warning("edits disabled: %s", exc)
                    runner = ModelRunner(model)
                self.engine = Engine(runner, config, observer=self.metrics)
            self.engine.start()
            if self.settings.warmup:
                w, h = self.default_size
                self.engine.warmup(GenerationParams(prompt="warm-up", width=w, height=h, num_inference_steps=1,
                                                    guidance_scale=self.settings.default_guidance_scale, seed=0))
                curve = self.engine.calibrate(w, h, self.settings.default_guidance_scale)
                log.info("step cost by UNet rows at %dx%d: %s", w, h,
                         ", ".join(f"{rows}: {sec * 1000:.1f} ms" for rows, sec in sorted(curve.items())))
            self.metrics.ready.labels(self.settings.pool).set(1)
            self.ready.set()
            log.info("worker ready: model %s, pool %s", self.settings.public_model_name(), self.settings.pool)
        except Exception as exc:  # reported on /readyz; the process stays up for diagnosis
            log.exception("model failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"


def create_app(settings: WorkerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or WorkerSettings()
    state = WorkerState(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.start_engine, name="stepfleet-loader", daemon=True)
        loader.start()
        yield
        state.ready.clear()
        loader.join(timeout=1.0)
        if state.engine is not None:
            # uvicorn has already waited for in-flight HTTP requests; drain what is left.
            await asyncio.to_thread(state.engine.stop, True, settings.graceful_shutdown_s)
        if state.own_cache is not None:
            state.own_cache.close()

    app = FastAPI(title="stepfleet worker", version="0.1.0", lifespan=lifespan)
    app.state.worker = state
    install_error_handlers(app)

    def load_headers() -> dict[str, str]:
        if state.engine is None:
            return {}
        load = state.engine.load()
        return {
            "X-Stepfleet-Backlog-Seconds": f"{load['backlog_s']:.3f}",
            "X-Stepfleet-Step-Units": f"{load['step_units']:.0f}",
        }

    app.add_middleware(RequestIdMiddleware, extra_headers=load_headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.ready.is_set():
            return JSONResponse({"status": "ready", "model": settings.public_model_name()})
        body = {"status": "failed" if state.load_error else "loading", "error": state.load_error}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.engine is not None:
            load = state.engine.load()
            state.metrics.queue_depth.labels(settings.pool).set(load["waiting"])
            state.metrics.backlog.labels(settings.pool).set(load["backlog_s"])
            cache = getattr(state.engine.runner, "cache", None)
            if cache is not None:
                state.metrics.observe_cache(cache.snapshot())
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.public_model_name(), created=state.started)])

    @app.get("/v1/load")
    async def load() -> dict[str, Any]:
        """The router's balancing signal (also sent on every response as a header)."""
        body: dict[str, Any] = {"ready": state.ready.is_set(), "pool": settings.pool}
        if state.engine is not None:
            body.update(state.engine.load())
        return body

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        body = await _json_body(request)
        try:
            req = ImageGenerationRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
        params = _to_params(req, state)
        engine = _ready_engine(state)
        try:
            ereq = engine.submit(params, request_id=request.state.request_id)
        except QueueFull as exc:
            state.metrics.on_rejected("generation", "rejected")
            raise APIError(429, "the worker's queue is full; retry later", code="queue_full",
                           headers={"Retry-After": str(int(exc.retry_after_s))}) from None
        except ShuttingDown:
            raise APIError(503, "the worker is shutting down", code="shutting_down",
                           headers={"Retry-After": "1"}) from None
        result = await _await_or_cancel(request, engine, ereq)
        data = await asyncio.to_thread(
            lambda: [{"b64_json": to_b64(im, params.output_format, req.output_compression)} for im in result.images]
        )
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": data,
                "output_format": params.output_format,
                "size": f"{params.width}x{params.height}",
                "stepfleet": {
                    "request_id": ereq.id,
                    "seed": result.seed,
                    "steps": result.steps,
                    "queue_s": round(result.queue_s, 6),
                    "total_s": round(result.total_s, 6),
                },
            }
        )

    from stepfleet.serving.edits.http import install_edit_routes

    install_edit_routes(app, state)
    return app


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None


def _ready_engine(state: WorkerState) -> Engine:
    if not state.ready.is_set() or state.engine is None:
        reason = state.load_error or "the model is still loading"
        raise APIError(503, f"worker not ready: {reason}", code="not_ready", headers={"Retry-After": "5"})
    return state.engine


def _to_params(req: ImageGenerationRequest, state: WorkerState) -> GenerationParams:
    s = state.settings
    try:
        if req.model is not None and req.model != s.public_model_name():
            raise APIError(404, f"model {req.model!r} is not served here (serving {s.public_model_name()!r})",
                           param="model", code="model_not_found")
        if req.response_format not in (None, "b64_json"):
            raise InvalidParam("response_format", f"{req.response_format!r} is not supported; this server returns "
                               "images inline, use 'b64_json'", code="unsupported_value")
        if req.stream:
            raise InvalidParam("stream", "streaming is not supported", code="unsupported_value")
        width, height = parse_size(req.size, state.default_size if state.engine else (256, 256), state.limits)
        params = GenerationParams(
            prompt=req.prompt,
            width=width,
            height=height,
            n=req.n,
            num_inference_steps=s.default_steps if req.num_inference_steps is None else req.num_inference_steps,
            guidance_scale=s.default_guidance_scale if req.guidance_scale is None else req.guidance_scale,
            negative_prompt=req.negative_prompt,
            scheduler=req.scheduler,
            seed=req.seed,
            priority=Priority.parse(req.priority),
            deadline_ms=req.deadline_ms,
            output_format=req.output_format or "png",
        )
        return validate(params, state.limits)
    except InvalidParam as exc:
        state.metrics.on_rejected("generation", "invalid")
        raise APIError(400, exc.message if exc.message.startswith(exc.param) else f"{exc.param}: {exc.message}",
                       param=exc.param, code=exc.code) from None


async def _await_or_cancel(request: Request, engine: Engine, ereq) -> Any:
    """Wait for the engine; if the client disconnects first, free the request's batch slot."""
    fut = asyncio.wrap_future(ereq.future)
    while True:
        done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            engine.cancel(ereq.id)
            fut.cancel()  # nobody will read its outcome now
            log.info("client went away; cancelled %s", ereq.id)
            raise APIError(499, "client closed request", code="client_closed")
    try:
        return fut.result()
    except RequestCancelled:
        raise APIError(503, "request was cancelled", code="cancelled") from None
    except Exception as exc:
        log.exception("request %s failed", ereq.id)
        raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed") from None
