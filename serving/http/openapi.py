"""This worker's `/openapi.json`: the shared request schemas, with this worker's own limits.

The schemas (`serving.schemas`) carry the bounds no worker exceeds, since the router checks
bodies with them without knowing which worker will serve; a worker's own limits are
settings (`--max-images`, `--max-steps`), so they are written into its schema here, where
its clients read them.
"""

from __future__ import annotations

from typing import Any

from stepfleet.serving.params import Limits
from stepfleet.serving.schemas import ErrorResponse

#: The error responses of routes that take a body. Documenting `4XX` also keeps FastAPI from
#: advertising its default 422, which this API never answers (refusals are 400).
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "refused; `error.param` names the field to fix"},
    429: {"model": ErrorResponse, "description": "the queue is full; retry after `Retry-After` seconds"},
    503: {"model": ErrorResponse, "description": "not ready (loading, or failed to load), or shutting down"},
}
#: Routes that stream with `stream: true`: the 200 may be Server-Sent Events.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "the images (JSON), or with `stream: true` Server-Sent Events: partial images, then "
                         "the completed image (OpenAI's `image_generation.*` / `image_edit.*` events)",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}
#: Routes of templates and edits, which need a model that can do masked compute.
EDIT_ERRORS: dict[int | str, dict[str, Any]] = {
    501: {"model": ErrorResponse, "description": "this worker's model does not support edits"},
}
#: The router's own: a request's `deadline_ms` passed before any worker answered.
DEADLINE_ERRORS: dict[int | str, dict[str, Any]] = {
    504: {"model": ErrorResponse, "description": "`deadline_ms` passed before a worker answered (router)"},
}
#: The Videos API: jobs looked up by id (404), content not ready (409), a model without videos (501).
VIDEO_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "refused (400 names the field), 404: no such video job, "
                                                   "409: its content is not ready"},
    429: {"model": ErrorResponse, "description": "the job store or the queue is full; retry after `Retry-After`"},
    501: {"model": ErrorResponse, "description": "this worker's model does not make videos"},
    503: ERRORS[503],
}
#: The adapter registry (`/v1/adapters`): 404 unknown, 413 too large, 422 not for this model,
#: 501 a worker without adapters, 507 no disk room for an upload.
ADAPTER_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "refused: 400 bad file or field, 404 no such adapter, 413 "
                                                   "over --max-adapter-bytes, 422 does not fit the model"},
    501: {"model": ErrorResponse, "description": "this worker serves no LoRA adapters"},
    503: ERRORS[503],
    507: {"model": ErrorResponse, "description": "no room on the adapter disk tier for an upload"},
}
#: The router's, for video routes: any worker's answer, and the router's own 503/504.
ROUTER_VIDEO_ERRORS: dict[int | str, dict[str, Any]] = {**VIDEO_ERRORS, **DEADLINE_ERRORS}
#: Routes that look a template up.
LOOKUP_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "404: no such template"},
    503: ERRORS[503],
    **EDIT_ERRORS,
}


def document_limits(schema: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Tighten `n` and `num_inference_steps` in every request schema to this worker's limits."""
    bounds = {"n": limits.max_images, "num_inference_steps": limits.max_steps}
    for component in schema.get("components", {}).get("schemas", {}).values():
        for name, maximum in bounds.items():
            prop = component.get("properties", {}).get(name)
            if prop is not None:
                for branch in [prop, *prop.get("anyOf", [])]:
                    if branch.get("type") == "integer":
                        branch["maximum"] = min(maximum, branch.get("maximum", maximum))
    return schema
