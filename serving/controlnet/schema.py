"""The `controlnet` request field's typed body (pydantic; shared by worker and router schemas).

The schema documents the field and checks types and ranges; what needs the worker (known names,
`--max-controlnets`, `guidance_start <= guidance_end`, decoding the image) is `spec.check_controls`
and `preprocess`, each error naming `controlnet[i].<field>`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: Most ControlNets one request may name on any worker (a worker's --max-controlnets is lower).
MAX_CONTROLNETS_PER_REQUEST = 8


class ControlNetUnit(BaseModel):
    """One ControlNet a request applies; several sum (diffusers' MultiControlNet)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128, description="a registered ControlNet (GET /v1/controlnets)")
    image: str | None = Field(None, description=(
        "the control image, base64 (or a data: URL) PNG/JPEG/WebP; its aspect ratio must match the output's "
        "and it is resized to the output size. In an edit form it may instead be a `controlnet_image` part "
        "(the parts fill the entries without an image, in order)"))
    conditioning_scale: float = Field(1.0, ge=0, le=10, description="multiplies the net's residuals (default 1)")
    guidance_start: float = Field(0.0, ge=0, le=1, description=(
        "fraction of the steps after which control starts (default 0)"))
    guidance_end: float = Field(1.0, ge=0, le=1, description=(
        "fraction of the steps after which control stops (default 1; not below guidance_start)"))
    preprocess: Literal["none", "canny"] | None = Field(None, description=(
        "canny: the image is a photo; its Canny edges (OpenCV) are the control (default none)"))
    low: int | None = Field(None, ge=0, le=255, description="canny's low hysteresis threshold (default 100)")
    high: int | None = Field(None, ge=0, le=255, description="canny's high hysteresis threshold (default 200)")


def _json_text(value: Any) -> Any:
    """A form sends `controlnet` as JSON text (which FastAPI hands over as a one-item list, a list-typed
    form field being a repeatable one); a JSON body as a list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError('must be a JSON list like [{"name": "canny", "image": "<base64>"}]') from None
    return value


# The length bound sits on the list alone: on the union it would be applied to an explicit null too.
ControlNetList = Annotated[
    Annotated[list[ControlNetUnit], Field(max_length=MAX_CONTROLNETS_PER_REQUEST)] | None,
    BeforeValidator(_json_text), Field(None, description=(
        "ControlNets to apply, each {name, image, conditioning_scale, guidance_start, guidance_end, preprocess, "
        "low, high}; several sum (a worker allows up to its --max-controlnets, default 2). In forms: the list "
        "as JSON text, images inline or as `controlnet_image` parts."))]
