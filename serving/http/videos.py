"""OpenAI's Videos API: `POST/GET /v1/videos`, `GET/DELETE /v1/videos/{id}`, `GET …/content`.

A job is created at once (`queued`) and runs on the shared engine (`serving.videos.service`);
clients poll it (`openai-poll-after-ms` tells the official SDK how often) and download the MP4
(`variant=thumbnail`: a PNG of the first frame) once it is `completed`. The official SDK
sends the create call as multipart form fields; JSON bodies are taken too. Extensions beside
OpenAI's fields: `num_frames`, `fps`, `num_inference_steps`, `seed`, `guidance_scale`,
`negative_prompt`, `priority`, `deadline_ms`.

Answers: 400 naming the field for values outside the model's limits; 404 for an unknown id;
409 for the content of a job not completed; 429 with `Retry-After` when the job store or the
engine's queue is full; 501 when the worker's model makes no videos.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from stepfleet.serving.engine import QueueFull, ShuttingDown
from stepfleet.serving.errors import APIError, validation_error
from stepfleet.serving.http.deps import ReadyEngine, State, Tenant
from stepfleet.serving.http.fields import check_model
from stepfleet.serving.http.openapi import VIDEO_ERRORS
from stepfleet.serving.jsonbody import parse_object, read_bounded
from stepfleet.serving.params import validate
from stepfleet.serving.videos.content import VARIANTS
from stepfleet.serving.videos.jobs import JobStatus, StoreFull, VideoJob
from stepfleet.serving.videos.schema import VideoCreateBody, documented_form
from stepfleet.serving.videos.service import VideoService
from stepfleet.serving.videos.spec import VideoLimits, parse_video

router = APIRouter(tags=["videos"])

#: How often the official SDK's `poll` asks (its default is 1 s; short clips finish sooner).
POLL_AFTER_MS = 250
MAX_BODY_BYTES = 1 << 20


async def video_service(state: State) -> VideoService:
    if state.videos is None:
        raise APIError(503, "video jobs are not set up on this worker", code="not_ready",
                       headers={"Retry-After": "5"})
    return state.videos


Videos = Annotated[VideoService, Depends(video_service)]


def video_limits(engine: ReadyEngine) -> VideoLimits:
    """The model's video limits; 501 when it makes no videos."""
    backbone = getattr(engine.runner, "backbone", None)
    # `backbones.base.MakesVideo`, checked by its method so this module imports no torch.
    if not callable(getattr(backbone, "video_latent_shape", None)):
        raise APIError(501, "this worker's model does not make videos", code="videos_unsupported")
    return VideoLimits(temporal_factor=int(getattr(backbone, "temporal", 4)))


async def _fields(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form()
        except Exception as exc:
            raise APIError(400, f"malformed form body: {exc}", code="invalid_multipart") from None
        fields = {k: v for k, v in form.items()}
        if not isinstance(fields.get("input_reference", ""), str):
            fields["input_reference"] = "upload"
        return fields
    return parse_object(await read_bounded(request, MAX_BODY_BYTES))


def _job(videos: VideoService, job_id: str, tenant: str) -> VideoJob:
    job = videos.jobs.get(job_id, tenant)
    if job is None:
        raise APIError(404, f"no video job {job_id!r}", param="video_id", code="video_not_found")
    return videos.refresh(job)


def _answer(job: VideoJob) -> JSONResponse:
    return JSONResponse(job.public(), headers={"openai-poll-after-ms": str(POLL_AFTER_MS)})


@router.post("/v1/videos", openapi_extra=documented_form(), responses=VIDEO_ERRORS)
async def create_video(request: Request, state: State, engine: ReadyEngine, videos: Videos,
                       tenant: Tenant) -> JSONResponse:
    """Queue a video job; it shares the engine's step loop with image requests."""
    limits = video_limits(engine)
    fields = await _fields(request)
    try:
        VideoCreateBody.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    s = state.settings
    model = fields.get("model")
    check_model(model if isinstance(model, str) else None, s)
    spec = parse_video(fields, model=s.public_model_name(), default_size=state.default_size, limits=state.limits,
                       video=limits, default_steps=s.default_steps, default_guidance=s.default_guidance_scale)
    validate(spec.params, state.limits)
    engine.runner.request_shape(spec.params)  # type: ignore[attr-defined]  # sizes the model cannot take: 400
    try:
        job = videos.submit(engine, spec, tenant)
    except StoreFull as exc:
        raise APIError(429, str(exc), code="video_store_full",
                       headers={"Retry-After": str(int(exc.retry_after_s + 0.999))}) from None
    except QueueFull as exc:
        raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": f"{exc.retry_after_s:.0f}"}) from None
    except ShuttingDown:
        raise APIError(503, "worker is shutting down", code="shutting_down", headers={"Retry-After": "1"}) from None
    return _answer(job)


@router.get("/v1/videos", responses=VIDEO_ERRORS)
async def list_videos(videos: Videos, tenant: Tenant, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      order: Literal["asc", "desc"] = "desc") -> JSONResponse:
    jobs, more = videos.jobs.list(tenant, after=after, limit=limit, order=order)
    data = [videos.refresh(j).public() for j in jobs]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": more})


@router.get("/v1/videos/{video_id}", responses=VIDEO_ERRORS)
async def get_video(video_id: str, videos: Videos, tenant: Tenant) -> JSONResponse:
    return _answer(_job(videos, video_id, tenant))


@router.get("/v1/videos/{video_id}/content", response_model=None, responses=VIDEO_ERRORS)
async def video_content(video_id: str, videos: Videos, tenant: Tenant,
                        variant: str = "video") -> FileResponse:
    """The MP4 (H.264), or `variant=thumbnail`: a PNG of the first frame."""
    if variant not in VARIANTS:
        raise APIError(400, f"variant: must be one of {', '.join(VARIANTS)} (got {variant!r})", param="variant",
                       code="invalid_value")
    job = _job(videos, video_id, tenant)
    if job.status is not JobStatus.COMPLETED:
        raise APIError(409, f"video {video_id} is {job.status.value}; its content exists once it is completed",
                       param="video_id", code="video_not_ready")
    path = await asyncio.to_thread(videos.content.path, video_id, variant)
    if path is None:
        raise APIError(404, f"the content of video {video_id} was evicted (the worker's video storage is full)",
                       param="video_id", code="video_content_evicted")
    return FileResponse(path, media_type=VARIANTS[variant][1])


@router.delete("/v1/videos/{video_id}", responses=VIDEO_ERRORS)
async def delete_video(video_id: str, state: State, videos: Videos, tenant: Tenant) -> JSONResponse:
    """Forget a job and its content; an unfinished one is cancelled at its next step boundary."""
    if videos.delete(state.engine, video_id, tenant) is None:
        raise APIError(404, f"no video job {video_id!r}", param="video_id", code="video_not_found")
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})
