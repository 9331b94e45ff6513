"""`GET /metrics`: the worker's Prometheus families (`serving.metrics`), gauges brought up to date."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stepfleet.serving.http.deps import State

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> PlainTextResponse:
    """Gauges of the queue (per kind too), paused videos and the template cache are read at scrape
    time (what they are now), not left as the last step plan set them."""
    m, pool = state.metrics, state.settings.pool
    if state.engine is not None:
        load = state.engine.load()
        m.queue_depth.labels(pool).set(load["waiting"])
        m.backlog.labels(pool).set(load["backlog_s"])
        waiting, paused_videos = state.engine.kinds()
        for kind, count in waiting.items():
            m.kind_queue.labels(pool, kind).set(count)
        m.paused_videos.labels(pool).set(paused_videos)
    if state.templates is not None:
        m.observe_cache(state.templates.cache.snapshot())
    if state.compiled is not None and state.compile_metrics is not None:
        state.compile_metrics.observe(state.compiled)
    return PlainTextResponse(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
