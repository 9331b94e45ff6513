"""`/v1/templates`: register an image for cached edits, list, show and forget templates.

Registering runs the image once through the denoising loop in the engine (a RECORD run:
full compute that stores every step's attention activations) and answers when it is done.
Additions and deletions go through `TemplateService`, which applies them on the engine's
loop thread; this module never touches the registry or the cache. A template belongs to the
tenant that registered it; other tenants get 404 for it (`edits.service`). The router
chooses a new template's id (`X-Stepfleet-Template-Id`) so that it lands on the id's home.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, Header

from stepfleet.serving.edits.templates import Template, TemplateKey, image_digest, record_params
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.deps import State, SubmitTemplate, Templates, Tenant
from stepfleet.serving.http.fields import check_image_size
from stepfleet.serving.http.openapi import EDIT_ERRORS, ERRORS, LOOKUP_ERRORS
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.http.uploads import UploadRoute, read_image
from stepfleet.serving.params import validate
from stepfleet.serving.schemas import TemplateDeleted, TemplateForm, TemplateList, TemplateObject

#: Template ids: the worker's own (`tmpl-` and 16 hex digits) or the router's choice.
TEMPLATE_ID = re.compile(r"tmpl-[A-Za-z0-9_-]{1,64}")

router = APIRouter(tags=["templates"], route_class=UploadRoute)


@router.post("/v1/templates", response_model=TemplateObject, responses=ERRORS | EDIT_ERRORS)
async def create_template(
    form: Annotated[TemplateForm, Form(media_type="multipart/form-data")], submit: SubmitTemplate,
    templates: Templates, state: State, tenant: Tenant,
    x_stepfleet_template_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> dict[str, Any]:
    """Record `image` with these settings; edits with the same settings then take the cached path."""
    template = new_template(form, await read_image(form.image, state.limits), state,
                            template_id=chosen_id(x_stepfleet_template_id))
    params = validate(record_params(template, form.negative_prompt), state.limits)
    if not await templates.add(template, tenant):
        raise APIError(409, f"template {template.id!r} exists already", code="template_exists")
    try:
        await submit(params)
    except BaseException:  # a template whose recording failed or was abandoned is no template
        with contextlib.suppress(Exception):
            await templates.delete(template.id, tenant)
        raise
    return templates.public(template)


@router.get("/v1/templates", response_model=TemplateList, responses=EDIT_ERRORS)
async def list_templates(templates: Templates, tenant: Tenant) -> dict[str, Any]:
    return {"object": "list", "data": [templates.public(t) for t in templates.all(tenant)]}


@router.get("/v1/templates/{template_id}", response_model=TemplateObject, responses=LOOKUP_ERRORS)
async def get_template(template_id: str, templates: Templates, tenant: Tenant) -> dict[str, Any]:
    template = templates.get(template_id, tenant)
    if template is None:
        raise not_found(template_id)
    return templates.public(template)


@router.delete("/v1/templates/{template_id}", response_model=TemplateDeleted, responses=LOOKUP_ERRORS)
async def delete_template(template_id: str, templates: Templates, tenant: Tenant) -> dict[str, Any]:
    """Forget the template and its cached activations."""
    if not await templates.delete(template_id, tenant):
        raise not_found(template_id)
    return {"id": template_id, "object": "template.deleted", "deleted": True}


def chosen_id(header: str | None) -> str:
    """The id the router chose (`X-Stepfleet-Template-Id`), or a new one."""
    if header is None:
        return f"tmpl-{secrets.token_hex(8)}"
    if not TEMPLATE_ID.fullmatch(header):
        raise APIError(400, "X-Stepfleet-Template-Id: must look like 'tmpl-' and up to 64 letters, digits, "
                       "'_' or '-'", code="invalid_template_id")
    return header


def not_found(template_id: str) -> APIError:
    return APIError(404, f"no template {template_id!r}", param="template_id", code="template_not_found")


def new_template(form: TemplateForm, image: Any, state: WorkerState, template_id: str | None = None) -> Template:
    """A template of `image` keyed by the form's settings (defaults: this worker's, seed 0, strength 1)."""
    s = state.settings
    check_image_size(form.size, image.size, state.limits)
    key = TemplateKey(
        width=image.size[0],
        height=image.size[1],
        steps=s.default_steps if form.num_inference_steps is None else form.num_inference_steps,
        scheduler=form.scheduler,
        guidance_scale=s.default_guidance_scale if form.guidance_scale is None else form.guidance_scale,
        seed=0 if form.seed is None else form.seed,
        strength=1.0 if form.strength is None else form.strength,
    )
    return Template(id=template_id or f"tmpl-{secrets.token_hex(8)}", key=key, prompt=form.prompt, image=image,
                    digest=image_digest(image))
