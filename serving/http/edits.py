"""`POST /v1/images/edits`: OpenAI's multipart image edit, on a template's cached path when it can.

An edit's settings default to its template's (so a plain edit of a registered template takes
the cached path); an edit that overrides them still works, by full compute, and the response
says which path ran in `X-Stepfleet-Edit-Path: cached|full`. An uploaded image identical,
pixel for pixel, to a registered template's is that template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Form
from fastapi.responses import JSONResponse, Response

from stepfleet.serving.contracts import EditPath
from stepfleet.serving.edits.templates import Template, image_digest
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.adapters import AdapterHold, lora_info, lora_spec
from stepfleet.serving.http.controlnets import controls_for, form_images
from stepfleet.serving.http.deps import State, SubmitEdit, Templates, Tenant
from stepfleet.serving.http.fields import check_image_size, check_model, check_stream
from stepfleet.serving.http.json_edits import EditRoute
from stepfleet.serving.http.openapi import EDIT_ERRORS, ERRORS, STREAM_RESPONSE
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.submit import Described, images_body
from stepfleet.serving.http.uploads import UploadRoute, read_image, read_mask
from stepfleet.serving.params import (
    EditSpec,
    GenerationParams,
    Priority,
    check_background,
    resolve_quality,
    validate,
)
from stepfleet.serving.schemas import ImageEditForm, ImagesResponse, ImageVariationForm

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from stepfleet.serving.edits.service import TemplateService

EDIT_PATH_HEADER = "X-Stepfleet-Edit-Path"
#: The settings that key a template's cache (`TemplateKey`); an edit that leaves one out takes
#: the template's, so a plain edit of a template runs on its cached activations.
KEYED = ("num_inference_steps", "guidance_scale", "scheduler", "seed", "strength")
#: OpenAI's `input_fidelity` → `strength` (when `strength` is not sent): how much of the input
#: the edited area keeps. `high` keeps 40 % of it (the denoising starts 60 % down the schedule).
INPUT_FIDELITY_STRENGTH = {"high": 0.6, "low": 1.0}
#: A variation's default `strength`: the layout and colours of the image stay, details change.
VARIATION_STRENGTH = 0.6

router = APIRouter(tags=["images"], route_class=UploadRoute)


async def create_edit(form: Annotated[ImageEditForm, Form(media_type="multipart/form-data")], submit: SubmitEdit,
                      templates: Templates, state: State, tenant: Tenant) -> Response:
    """Inpaint the area the mask leaves transparent; the rest keeps the image's pixels exactly."""
    template, image, inputs = await edit_source(form, templates, state, tenant)
    mask = await read_mask(form.mask, image.size)
    control_images = await form_images(form.controlnet, form.controlnet_image)
    params, described = edit_params(form, image, mask, template, state, inputs, control_images)
    async with AdapterHold(params.lora, state.adapters):
        if form.stream:
            return await submit.stream(params, form.partial_images or 0, described,
                                       template_id=template.id if template else None)
        done = await submit(params)
    path = done.result.edit_path or EditPath.FULL
    body = await images_body(done, submit.engine, described, edit_path=path.value,
                             template_id=template.id if template else None, **lora_info(params.lora))
    return JSONResponse(body, headers={EDIT_PATH_HEADER: path.value})


# A form, or OpenAI's JSON body turned into that form (`json_edits.EditRoute`).
router.add_api_route(
    "/v1/images/edits", create_edit, methods=["POST"], route_class_override=EditRoute, response_model=ImagesResponse,
    responses=ERRORS | EDIT_ERRORS | STREAM_RESPONSE,
    response_description=f"the edited images; `{EDIT_PATH_HEADER}` says whether the cached path ran",
)


@router.post("/v1/images/variations", response_model=ImagesResponse, responses=ERRORS | EDIT_ERRORS)
async def create_variation(form: Annotated[ImageVariationForm, Form(media_type="multipart/form-data")],
                           submit: SubmitEdit, templates: Templates, state: State) -> JSONResponse:
    """Variations of `image`: image-to-image over the whole image at `strength` (default 0.6),
    without a prompt unless one is given (then guided by it)."""
    from stepfleet.serving.edits.masks import whole_image_mask

    s = state.settings
    check_model(form.model, s)
    image = await read_image(form.image, state.limits)
    check_image_size(form.size, image.size, state.limits)
    prompt = form.prompt or ""
    params = validate(GenerationParams(
        prompt=prompt,
        width=image.size[0],
        height=image.size[1],
        n=form.n,
        num_inference_steps=s.default_steps if form.num_inference_steps is None else form.num_inference_steps,
        guidance_scale=(form.guidance_scale if form.guidance_scale is not None
                        else s.default_guidance_scale if prompt else 1.0),
        scheduler=form.scheduler,
        seed=form.seed,
        priority=Priority.parse(form.priority),
        deadline_ms=form.deadline_ms,
        output_format=form.output_format or "png",
        edit=EditSpec(image=image, pixel_mask=whole_image_mask(image.size),
                      strength=VARIATION_STRENGTH if form.strength is None else form.strength),
    ), state.limits)
    done = await submit(params)
    described = Described(quality="medium", output_compression=form.output_compression, event="image_edit",
                          input_images=(image.size,))
    return JSONResponse(await images_body(done, submit.engine, described))


async def edit_source(form: ImageEditForm, templates: TemplateService, state: WorkerState,
                      tenant: str = "") -> tuple[Template | None, Image.Image, tuple[tuple[int, int], ...]]:
    """The template the edit is of (if any), the image it edits (404 for an unknown `template_id`,
    or one of another tenant's), and the sizes of every input image (`usage`).

    Of several images (`image[]`, up to 16) the first is edited; the others are read and checked
    like it (a 400 naming `image[]` when one is not an image) but no served family conditions on
    reference images."""
    if form.template_id:
        template = templates.get(form.template_id, tenant)
        if template is None:
            raise APIError(404, f"template_id: no template {form.template_id!r}", param="template_id",
                           code="template_not_found")
        return template, template.image, (template.image.size,)
    uploads = ([form.image] if form.image else []) + list(form.image_list or [])
    if not uploads:
        raise APIError(400, "image: send an image (or a template_id)", param="image", code="missing_parameter")
    first = "image" if form.image else "image[]"
    image = await read_image(uploads[0], state.limits, param=first)
    sizes = [image.size]
    for upload in uploads[1:]:
        sizes.append((await read_image(upload, state.limits, param="image[]")).size)
    return templates.find(image_digest(image), tenant), image, tuple(sizes)


def edit_params(form: ImageEditForm, image: Image.Image, mask: torch.Tensor, template: Template | None,
                state: WorkerState, inputs: tuple[tuple[int, int], ...] = (),
                control_images: Mapping[int, bytes] | None = None) -> tuple[GenerationParams, Described]:
    """The engine's request: the form's settings, else the template's, else this worker's defaults;
    and what the response says of it."""
    s = state.settings
    check_model(form.model, s)
    check_stream(form.stream, form.n, state.streaming)
    background = check_background(form.background)
    check_image_size(form.size, image.size, state.limits)
    quality, quality_steps = resolve_quality(form.quality, s.default_steps, state.limits.max_steps)
    fallback = template.key.as_dict() if template is not None else {
        "num_inference_steps": quality_steps, "guidance_scale": s.default_guidance_scale, "scheduler": None,
        "seed": None, "strength": 1.0,
    }
    if form.input_fidelity is not None:
        fallback = fallback | {"strength": INPUT_FIDELITY_STRENGTH[form.input_fidelity]}
    keyed = {k: fallback[k] for k in KEYED} | form.model_dump(include=set(KEYED), exclude_none=True)
    params = GenerationParams(
        prompt=form.prompt,
        width=image.size[0],
        height=image.size[1],
        n=form.n,
        num_inference_steps=keyed["num_inference_steps"],
        guidance_scale=keyed["guidance_scale"],
        negative_prompt=form.negative_prompt,
        scheduler=keyed["scheduler"],
        seed=keyed["seed"],
        priority=Priority.parse(form.priority),
        deadline_ms=form.deadline_ms,
        output_format=form.output_format or "png",
        edit=EditSpec(template_id=template.id if template else None, image=None if template else image,
                      pixel_mask=mask, strength=keyed["strength"],
                      # cached activations were recorded without adapters or control
                      use_cache=not form.lora and not form.controlnet),
        lora=lora_spec(form.lora, form.lora_wait, state),
        controlnet=controls_for(form.controlnet, state, image.size[0], image.size[1], control_images),
    )
    described = Described(quality=quality, background=background, output_compression=form.output_compression,
                          event="image_edit", input_images=inputs or (image.size,))
    return validate(params, state.limits), described
