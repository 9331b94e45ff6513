"""Video jobs through the router: created where balancing sends them, then pinned there.

A job's latents, progress and MP4 live on the worker that runs it, so every follow-up call
(`GET /v1/videos/{id}`, its `/content`, `DELETE`) must reach that worker. The router records
`id → worker` from the create call's answer (`VideoHomes`, bounded, most recent kept) and asks
only that worker; an id it does not know (the router restarted, or another replica created
it) is asked of every available worker and the one that answers 2xx is recorded. A listing
merges every worker's jobs of the caller's tenant, newest first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stepfleet.serving.errors import APIError
from stepfleet.serving.http.openapi import ROUTER_VIDEO_ERRORS
from stepfleet.serving.router import costing
from stepfleet.serving.router.templates import (
    TemplateHomes,
    ask_all,
    first_found,
    listed_items,
    registered_id,
)
from stepfleet.serving.router.upstream import Reply
from stepfleet.serving.videos.schema import documented_form

#: Timeout of a follow-up call: content downloads are files on the worker's disk.
FOLLOW_UP_TIMEOUT_S = 30.0
#: Frames per second and seconds a video job gets when it names neither (OpenAI's 4 s; Wan's 16 fps).
DEFAULT_FPS, DEFAULT_SECONDS = 16, 4.0
#: The Wan VAE keeps the first frame, then one latent frame per 4: what a step's cost scales with.
TEMPORAL_FACTOR = 4


def _number(value: object, default: float) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return number if number > 0 and number == number and number != float("inf") else default


def video_cost(fields: dict[str, Any], default_steps: int, default_size: int) -> costing.RequestCost:
    """A video job's balancing cost: an image's step units times its latent frames (the worker
    validates the fields; a malformed one is priced at the defaults here)."""
    w, h = costing.parse_size(fields.get("size") if isinstance(fields.get("size"), str) else None, default_size)
    steps = int(_number(fields.get("num_inference_steps"), default_steps))
    frames = _number(fields.get("num_frames"), 0) or (
        _number(fields.get("seconds"), DEFAULT_SECONDS) * _number(fields.get("fps"), DEFAULT_FPS))
    latent_frames = int(max(1.0, frames) - 1) // TEMPORAL_FACTOR + 1
    guidance = _number(fields.get("guidance_scale"), 5.0)
    units = costing.generation_units(steps, w, h, 1, guidance) * latent_frames
    return costing.RequestCost("other", units, units)


class VideoHomes(TemplateHomes):
    """Where video jobs were created: id → worker URL."""

    def record_reply(self, reply: Any) -> None:
        video_id = registered_id(reply)
        if video_id:
            self.record(video_id, reply.url)


def merge_video_lists(replies: Sequence[tuple[Any, Reply]], limit: int = 100) -> dict[str, Any]:
    """One OpenAI video list of every worker's 2xx listing, newest first."""
    items = listed_items(replies) or {}
    ordered = sorted(items.values(), key=lambda v: (v.get("created_at") or 0, v["id"]), reverse=True)
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}


def install_videos(app: FastAPI, router: Any, homes: VideoHomes,
                   proxied: Callable[..., Awaitable[Response]], upstream_target: Callable[[Request], str]) -> None:
    """Add the Videos API routes (before the router's catch-all)."""

    @app.post("/v1/videos", tags=["videos"], openapi_extra=documented_form(), responses=ROUTER_VIDEO_ERRORS)
    async def create_video(request: Request) -> Response:
        async def plan_of(body: bytes) -> Any:
            from stepfleet.serving.router.app import Plan

            fields: dict[str, Any] = {}
            if request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                                     "application/x-www-form-urlencoded")):
                try:
                    form = await request.form()
                    fields = {k: v for k, v in form.items() if isinstance(v, str)}
                    await form.close()
                except Exception:  # the worker answers a malformed body with its own 400
                    fields = {}
            else:
                try:
                    data = json.loads(body)
                    fields = data if isinstance(data, dict) else {}
                except ValueError:
                    fields = {}
            s = router.settings
            deadline = _number(fields.get("deadline_ms"), 0) or None
            return Plan(video_cost(fields, s.default_steps, s.default_size), deadline)

        return await proxied(request, "videos", plan_of)

    async def pinned(request: Request, video_id: str | None) -> tuple[Any, Reply]:
        tenant = router.authorize(request)
        available = router.available_workers()
        if not available:
            raise APIError(503, "no worker is available", code="no_pool", headers={"Retry-After": "5"})
        home = homes.get(video_id)
        targets = [e for e in available if e.url == home] or available
        headers = [("x-request-id", request.state.request_id)] + router.headers_for(tenant)
        replies = await ask_all(router.client, targets, request.method, upstream_target(request), headers,
                                FOLLOW_UP_TIMEOUT_S)
        if not replies:
            raise APIError(503, "no worker answered", code="upstream_unavailable", headers={"Retry-After": "1"})
        if video_id is None:
            return None, Reply(200, [], json.dumps(merge_video_lists(replies)).encode())
        found = first_found(replies)
        assert found is not None
        ep, reply = found
        if ep is not None and 200 <= reply.status < 300:
            homes.record(video_id, ep.url)
        return ep, reply

    def relayed(ep: Any, reply: Reply, route: str) -> Response:
        router.metrics.requests.labels(ep.pool if ep is not None else "all", route, str(reply.status)).inc()
        keep = {"content-type", "retry-after", "openai-poll-after-ms"}
        headers = {k: v for k, v in reply.headers if k.lower() in keep}
        return Response(reply.content, status_code=reply.status, headers=headers,
                        media_type=headers.get("content-type", "application/json"))

    @app.get("/v1/videos", tags=["videos"], responses=ROUTER_VIDEO_ERRORS)
    async def list_videos(request: Request) -> Response:
        _, reply = await pinned(request, None)
        return JSONResponse(json.loads(reply.content))

    @app.get("/v1/videos/{video_id}", tags=["videos"], responses=ROUTER_VIDEO_ERRORS)
    async def get_video(request: Request, video_id: str) -> Response:
        return relayed(*await pinned(request, video_id), "videos")

    @app.get("/v1/videos/{video_id}/content", tags=["videos"], responses=ROUTER_VIDEO_ERRORS)
    async def video_content(request: Request, video_id: str) -> Response:
        return relayed(*await pinned(request, video_id), "videos")

    @app.delete("/v1/videos/{video_id}", tags=["videos"], responses=ROUTER_VIDEO_ERRORS)
    async def delete_video(request: Request, video_id: str) -> Response:
        ep, reply = await pinned(request, video_id)
        if 200 <= reply.status < 300:
            homes.forget(video_id)
        return relayed(ep, reply, "videos")
