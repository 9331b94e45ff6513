"""The router's look at a JSON edit body (OpenAI's `images: [{"image_url": ...}]`) before forwarding.

The router checks the body with the worker's own model (`schemas.ImageEditJSON`: a 400
naming the field, never sent to a worker) and predicts its cost; it never fetches or decodes
the images: the worker that serves the edit does that (`serving.http.json_edits`), under
its own remote-URL rules.
"""

from __future__ import annotations

from pydantic import ValidationError

from stepfleet.serving.errors import APIError, validation_error
from stepfleet.serving.jsonbody import parse_object
from stepfleet.serving.router import costing
from stepfleet.serving.schemas import ImageEditJSON


def is_json(content_type: str) -> bool:
    """Whether a request's content type is JSON (`application/json` or `application/*+json`)."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def json_edit_cost(body: bytes, default_steps: int, default_size: int) -> tuple[costing.RequestCost, float | None, bool]:
    """(cost, `deadline_ms`, `stream`) of a JSON edit; a 400 naming the field when the body is not one.

    A mask sent by URL is not decoded here, so a cached edit is costed as a full one (the
    cost only orders work; the worker runs the cached path all the same)."""
    data = parse_object(body)
    try:
        edit = ImageEditJSON.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    if not edit.images and edit.template_id is None:
        raise APIError(400, "images: send images (or a template_id)", param="images", code="missing_parameter")
    texts = {k: str(v) for k, v in data.items() if k in ("size", "num_inference_steps", "n", "guidance_scale",
                                                         "template_id") and v is not None}
    cost = costing.edit_cost(texts, None, default_steps, default_size)
    return cost, edit.deadline_ms, bool(edit.stream)
