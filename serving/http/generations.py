"""`POST /v1/images/generations`: text to image, OpenAI's request and response.

With `stream: true` the answer is Server-Sent Events: `partial_images` previews, then the
image (`http.streams`, `serving.previews`).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from stepfleet.serving.http.adapters import AdapterHold, lora_info, lora_spec
from stepfleet.serving.http.controlnets import controls_for
from stepfleet.serving.http.deps import State, SubmitGeneration
from stepfleet.serving.http.fields import check_model, check_stream
from stepfleet.serving.http.json_route import JSONRoute
from stepfleet.serving.http.openapi import ERRORS, STREAM_RESPONSE
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.submit import Described, images_body
from stepfleet.serving.params import (
    GenerationParams,
    Priority,
    check_background,
    parse_size,
    resolve_quality,
    validate,
)
from stepfleet.serving.schemas import ImageGenerationRequest, ImagesResponse

router = APIRouter(tags=["images"], route_class=JSONRoute)


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS | STREAM_RESPONSE)
async def create_image(body: ImageGenerationRequest, submit: SubmitGeneration, state: State) -> Response:
    """Make `n` images of `prompt`; they batch with other requests at every denoising step."""
    params, described = generation_params(body, state), described_of(body, state)
    async with AdapterHold(params.lora, state.adapters):
        if body.stream:
            return await submit.stream(params, body.partial_images or 0, described)
        done = await submit(params)
    return JSONResponse(await images_body(done, submit.engine, described, **lora_info(params.lora)))


def described_of(body: ImageGenerationRequest, state: WorkerState) -> Described:
    """What the response says of `body` besides its images (`quality` as run, `background`)."""
    quality, _ = resolve_quality(body.quality, state.settings.default_steps, state.limits.max_steps)
    return Described(quality=quality, background=check_background(body.background),
                     output_compression=body.output_compression)


def generation_params(body: ImageGenerationRequest, state: WorkerState) -> GenerationParams:
    """The engine's request for `body`, with this worker's defaults and limits (`InvalidParam` names
    a field it cannot serve)."""
    s = state.settings
    check_model(body.model, s)
    check_stream(body.stream, body.n, state.streaming)
    check_background(body.background)
    _, quality_steps = resolve_quality(body.quality, s.default_steps, state.limits.max_steps)
    width, height = parse_size(body.size, state.default_size, state.limits)
    params = GenerationParams(
        prompt=body.prompt,
        width=width,
        height=height,
        n=body.n,
        num_inference_steps=quality_steps if body.num_inference_steps is None else body.num_inference_steps,
        guidance_scale=s.default_guidance_scale if body.guidance_scale is None else body.guidance_scale,
        negative_prompt=body.negative_prompt,
        scheduler=body.scheduler,
        seed=body.seed,
        priority=Priority.parse(body.priority),
        deadline_ms=body.deadline_ms,
        output_format=body.output_format or "png",
        original_size=height_width(body.original_size),
        target_size=height_width(body.target_size),
        crop_top_left=body.crops_coords_top_left or (0, 0),
        lora=lora_spec(body.lora, body.lora_wait, state),
        controlnet=controls_for(body.controlnet, state, width, height),
    )
    return validate(params, state.limits)


def height_width(size: str | None) -> tuple[int, int] | None:
    """`"WxH"` (OpenAI's order, checked by the schema) → (height, width), diffusers' order."""
    if size is None:
        return None
    w, _, h = size.partition("x")
    return int(h), int(w)
