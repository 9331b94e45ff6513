"""`POST /v1/images/generations`: text to image, OpenAI's request and response."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from stepfleet.serving.http.deps import State, SubmitGeneration
from stepfleet.serving.http.fields import check_model, check_no_stream
from stepfleet.serving.http.json_route import JSONRoute
from stepfleet.serving.http.openapi import ERRORS
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.submit import images_body
from stepfleet.serving.params import GenerationParams, Priority, parse_size, validate
from stepfleet.serving.schemas import ImageGenerationRequest, ImagesResponse

router = APIRouter(tags=["images"], route_class=JSONRoute)


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS)
async def create_image(body: ImageGenerationRequest, submit: SubmitGeneration, state: State) -> JSONResponse:
    """Make `n` images of `prompt`; they batch with other requests at every denoising step."""
    done = await submit(generation_params(body, state))
    return JSONResponse(await images_body(done, body.output_compression))


def generation_params(body: ImageGenerationRequest, state: WorkerState) -> GenerationParams:
    """The engine's request for `body`, with this worker's defaults and limits (`InvalidParam` names
    a field it cannot serve)."""
    s = state.settings
    check_model(body.model, s)
    check_no_stream(body.stream)
    width, height = parse_size(body.size, state.default_size, state.limits)
    params = GenerationParams(
        prompt=body.prompt,
        width=width,
        height=height,
        n=body.n,
        num_inference_steps=s.default_steps if body.num_inference_steps is None else body.num_inference_steps,
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
    )
    return validate(params, state.limits)


def height_width(size: str | None) -> tuple[int, int] | None:
    """`"WxH"` (OpenAI's order, checked by the schema) → (height, width), diffusers' order."""
    if size is None:
        return None
    w, _, h = size.partition("x")
    return int(h), int(w)
