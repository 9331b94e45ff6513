"""Liveness, readiness, the served model, and the router's balancing signal.

`/healthz` answers as soon as the process serves HTTP (a big model loads for minutes and
the pod must not be killed meanwhile); `/readyz` only once the model is loaded and warmed
up. A load that failed stays failed: `/readyz` says `{"status": "failed", "error": ...}`
(the operator reads this shape, e.g. a `FamilyMismatch`) and the process stays up for
diagnosis.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from stepfleet.serving.http.deps import State
from stepfleet.serving.schemas import ModelCard, ModelList

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    if state.ready.is_set():
        return JSONResponse({"status": "ready", "model": state.settings.public_model_name()})
    body: dict[str, Any] = {"status": "failed" if state.load_error else "loading", "error": state.load_error}
    if state.compiled is not None:  # warm-up compiles every bucket before the worker is ready
        snap = state.compiled.snapshot()
        body["compile"] = {"buckets_compiled": snap.buckets_done, "buckets_total": snap.buckets_total,
                           "seconds": round(sum(snap.compile_seconds.values()), 1)}
    return JSONResponse(body, status_code=503)


@router.get("/v1/models", tags=["models"])
async def models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=state.settings.public_model_name(), created=state.started)])


@router.get("/v1/load")
async def load(state: State) -> dict[str, Any]:
    """The router's balancing signal (also sent on every response as headers)."""
    body: dict[str, Any] = {"ready": state.ready.is_set(), "pool": state.settings.pool}
    if state.engine is not None:
        body.update(state.engine.load())
        b = state.engine.batching()  # how batches are sized now, and why (issue 21)
        body["batching"] = {"mode": b.mode, "cap_images": b.cap_images, "cap_rows": b.cap_rows, "reason": b.reason,
                            "step_s_by_unet_rows": {k: {str(r): s for r, s in c.items()} for k, c in b.curves.items()}}
    return body
