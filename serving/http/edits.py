"""`POST /v1/images/edits`: OpenAI's multipart image edit, on a template's cached path when it can.

An edit's settings default to its template's (so a plain edit of a registered template takes
the cached path); an edit that overrides them still works, by full compute, and the response
says which path ran in `X-Stepfleet-Edit-Path: cached|full`. An uploaded image identical,
pixel for pixel, to a registered template's is that template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Form
from fastapi.responses import JSONResponse

from stepfleet.serving.contracts import EditPath
from stepfleet.serving.edits.templates import Template, image_digest
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.deps import State, SubmitEdit, Templates, Tenant
from stepfleet.serving.http.fields import check_image_size, check_model, check_no_stream
from stepfleet.serving.http.openapi import EDIT_ERRORS, ERRORS
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.submit import images_body
from stepfleet.serving.http.uploads import UploadRoute, read_image, read_mask
from stepfleet.serving.params import EditSpec, GenerationParams, Priority, validate
from stepfleet.serving.schemas import ImageEditForm, ImagesResponse

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from stepfleet.serving.edits.service import TemplateService

EDIT_PATH_HEADER = "X-Stepfleet-Edit-Path"
#: The settings that key a template's cache (`TemplateKey`); an edit that leaves one out takes
#: the template's, so a plain edit of a template runs on its cached activations.
KEYED = ("num_inference_steps", "guidance_scale", "scheduler", "seed", "strength")

router = APIRouter(tags=["images"], route_class=UploadRoute)


@router.post(
    "/v1/images/edits", response_model=ImagesResponse, responses=ERRORS | EDIT_ERRORS,
    response_description=f"the edited images; `{EDIT_PATH_HEADER}` says whether the cached path ran",
)
async def create_edit(form: Annotated[ImageEditForm, Form(media_type="multipart/form-data")], submit: SubmitEdit,
                      templates: Templates, state: State, tenant: Tenant) -> JSONResponse:
    """Inpaint the area the mask leaves transparent; the rest keeps the image's pixels exactly."""
    template, image = await edit_source(form, templates, state, tenant)
    mask = await read_mask(form.mask, image.size)
    done = await submit(edit_params(form, image, mask, template, state))
    path = done.result.edit_path or EditPath.FULL
    body = await images_body(done, form.output_compression, edit_path=path.value,
                             template_id=template.id if template else None)
    return JSONResponse(body, headers={EDIT_PATH_HEADER: path.value})


async def edit_source(form: ImageEditForm, templates: TemplateService, state: WorkerState,
                      tenant: str = "") -> tuple[Template | None, Image.Image]:
    """The template the edit is of (if any) and the image it edits (404 for an unknown `template_id`,
    or one of another tenant's)."""
    if form.template_id:
        template = templates.get(form.template_id, tenant)
        if template is None:
            raise APIError(404, f"template_id: no template {form.template_id!r}", param="template_id",
                           code="template_not_found")
        return template, template.image
    upload = form.image or (form.image_list[0] if form.image_list else None)
    if upload is None:
        raise APIError(400, "image: send an image (or a template_id)", param="image", code="missing_parameter")
    image = await read_image(upload, state.limits)
    return templates.find(image_digest(image), tenant), image


def edit_params(form: ImageEditForm, image: Image.Image, mask: torch.Tensor, template: Template | None,
                state: WorkerState) -> GenerationParams:
    """The engine's request: the form's settings, else the template's, else this worker's defaults."""
    s = state.settings
    check_model(form.model, s)
    check_no_stream(form.stream)
    check_image_size(form.size, image.size, state.limits)
    fallback = template.key.as_dict() if template is not None else {
        "num_inference_steps": s.default_steps, "guidance_scale": s.default_guidance_scale, "scheduler": None,
        "seed": None, "strength": 1.0,
    }
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
                      pixel_mask=mask, strength=keyed["strength"]),
    )
    return validate(params, state.limits)
