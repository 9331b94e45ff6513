"""`GET /v1/controlnets`, and turning a request's `controlnet` field into the engine's `ControlSpec`s.

The routes of generations and edits call `controls_for`: names are checked against the nets this
worker registered (404 `controlnet_not_found` for another), the count against `--max-controlnets`,
the window and thresholds by `controlnet.spec`, and each image is decoded, size-checked and
preprocessed by `controlnet.preprocess` — every failure a 4xx naming `controlnet[i].<field>`,
before the engine sees the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter

from stepfleet.serving.controlnet.preprocess import control_spec
from stepfleet.serving.controlnet.schema import ControlNetUnit
from stepfleet.serving.controlnet.spec import check_controls
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.deps import State
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.params import ControlSpec, InvalidParam

router = APIRouter(tags=["controlnets"])


@router.get("/v1/controlnets")
async def list_controlnets(state: State) -> dict[str, Any]:
    """The ControlNets requests may name (`controlnet: [{"name": ...}]`), with what each reads."""
    return {
        "object": "list",
        "data": [{"id": e.name, "object": "controlnet", "kind": e.kind, "source": e.source}
                 for e in state.controlnets],
        "max_per_request": state.settings.max_controlnets,
        "placement": state.settings.controlnet_placement,
    }


def controls_for(units: Sequence[ControlNetUnit] | None, state: WorkerState, width: int, height: int,
                 images: Mapping[int, bytes] | None = None) -> tuple[ControlSpec, ...]:
    """The request's checked controls; `images` are multipart parts standing in for inline images."""
    if not units:
        return ()
    raw = [u.model_dump(exclude_none=True) for u in units]
    try:
        checked = check_controls(raw, {e.name for e in state.controlnets}, state.settings.max_controlnets, images)
        side = 2 * state.limits.max_image_size
        return tuple(control_spec(c, width, height, side) for c in checked)
    except InvalidParam as exc:
        if exc.code == "controlnet_not_found":
            raise APIError(404, f"{exc.param}: {exc.message}", param=exc.param, code=exc.code) from None
        raise


async def form_images(units: Sequence[ControlNetUnit] | None, parts: Sequence[Any] | None) -> dict[int, bytes]:
    """Multipart `controlnet_image` parts → the indices of the entries without an inline image, in order."""
    if not parts:
        return {}
    missing = [i for i, u in enumerate(units or ()) if u.image is None]
    if len(parts) > len(missing):
        raise InvalidParam("controlnet_image", f"{len(parts)} controlnet_image parts for {len(missing)} "
                           "controlnet entries without an image")
    return {i: await part.read() for i, part in zip(missing, parts, strict=False)}
