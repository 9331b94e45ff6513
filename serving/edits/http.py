"""The worker's edit endpoints: `POST /v1/images/edits` (OpenAI multipart) and `/v1/templates`.

Uploads are decoded and checked here, before anything reaches the engine, so that every bad
input is an error naming its field: an upload over `max_upload_bytes` or an image over the
size limit is 413; a mask that is not a PNG, has no alpha, or differs in size from the image
is 400 naming `mask`; an unknown `template_id` is 404. Pillow's pixel limit
(`Image.MAX_IMAGE_PIXELS`) is set from the size limit, and its warning is an error here, so a
decompression bomb is refused before it is decoded.

An edit's settings default to its template's (so a plain edit of a registered template takes
the cached path); an edit that overrides them still works, by full compute, and the response
says which path ran in `X-Stepfleet-Edit-Path: cached|full`.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import time
import warnings
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from stepfleet.serving.app import WorkerState, _await_or_cancel, _ready_engine
from stepfleet.serving.engine import QueueFull, ShuttingDown
from stepfleet.serving.errors import APIError
from stepfleet.serving.images import to_b64
from stepfleet.serving.params import (
    SCHEDULERS,
    EditSpec,
    GenerationParams,
    InvalidParam,
    parse_size,
    validate,
)

EDIT_PATH_HEADER = "X-Stepfleet-Edit-Path"
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")

_EDIT_FIELDS = {
    "image", "image[]", "mask", "prompt", "template_id", "n", "size", "response_format", "output_format",
    "output_compression", "num_inference_steps", "guidance_scale", "seed", "scheduler", "strength",
    "negative_prompt", "priority", "deadline_ms", "model", "user", "quality", "background", "input_fidelity",
    "stream", "partial_images",
}
_TEMPLATE_FIELDS = {"image", "image[]", "prompt", "size", "num_inference_steps", "guidance_scale", "seed",
                    "scheduler", "strength", "negative_prompt"}


def set_pixel_limit(max_image_size: int) -> None:
    """Refuse images with more pixels than a square of twice the size limit (decompression bombs)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = (2 * max_image_size) ** 2


async def _form(request: Request, state: WorkerState, allowed: set[str]) -> dict[str, Any]:
    limit = state.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is None:
        raise APIError(411, "a Content-Length is required for uploads", code="length_required")
    if int(length) > limit:
        raise APIError(413, f"upload of {int(length)} bytes exceeds the limit of {limit} bytes", param="image",
                       code="too_large")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise APIError(400, "send multipart/form-data (image, mask, prompt, ...)", code="invalid_content_type")
    try:
        form = await request.form()
    except Exception as exc:
        raise APIError(400, f"malformed multipart body: {exc}", code="invalid_multipart") from None
    out: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name not in allowed:
            raise APIError(400, f"{name}: unknown field", param=name, code="unknown_parameter")
        if isinstance(value, UploadFile):
            value = await value.read()
        key = "image" if name == "image[]" else name
        if key in out and key == "image":
            raise APIError(400, "image: send one image per request", param="image", code="invalid_value")
        out[key] = value
    return out


def _text(form: dict[str, Any], name: str) -> str | None:
    v = form.get(name)
    if v is None:
        return None
    if isinstance(v, bytes):
        raise APIError(400, f"{name}: expected a text field, got a file", param=name, code="invalid_value")
    return v


def _number(form: dict[str, Any], name: str, kind: type) -> Any:
    v = _text(form, name)
    if v is None or v == "":
        return None
    try:
        return kind(v)
    except ValueError:
        raise APIError(400, f"{name}: must be a {kind.__name__} (got {v!r})", param=name,
                       code="invalid_value") from None


def decode_image(data: Any, state: WorkerState, param: str = "image"):
    """Upload bytes → an RGB PIL image of an allowed size (413 when too large, 400 when unusable)."""
    from PIL import Image

    if not isinstance(data, bytes):
        raise APIError(400, f"{param}: must be an uploaded file", param=param, code="invalid_value")
    limit = state.settings.max_image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in _IMAGE_FORMATS:
                raise APIError(400, f"{param}: must be PNG, JPEG or WebP (got {img.format})", param=param,
                               code="invalid_image_format")
            if max(img.size) > limit:
                raise APIError(413, f"{param}: {img.size[0]}x{img.size[1]} exceeds the limit of {limit} pixels "
                               "per side", param=param, code="image_too_large")
            img.load()
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, f"{param}: too many pixels (decompression bomb refused)", param=param,
                       code="image_too_large") from None
    except Exception:
        raise APIError(400, f"{param}: not a readable image", param=param, code="invalid_image") from None
    w, h = img.size
    if w % 8 or h % 8 or min(w, h) < state.limits.min_image_size:
        raise APIError(400, f"{param}: width and height must be multiples of 8 and at least "
                       f"{state.limits.min_image_size} (got {w}x{h})", param=param, code="invalid_image_size")
    return img.convert("RGB")


def _edit_runner(state: WorkerState):
    engine = _ready_engine(state)
    runner = engine.runner
    if getattr(runner, "mu", None) is None:
        raise APIError(501, "this worker's model does not support edits", code="edits_unsupported")
    return engine, runner


def _invalid(state: WorkerState, exc: InvalidParam, kind: str) -> APIError:
    state.metrics.on_rejected(kind, "invalid")
    msg = exc.message if exc.message.startswith(exc.param) else f"{exc.param}: {exc.message}"
    return APIError(400, msg, param=exc.param, code=exc.code)


async def _submit(request: Request, state: WorkerState, engine, params: GenerationParams, kind: str):
    try:
        ereq = engine.submit(params, request_id=request.state.request_id, kind=kind)
    except QueueFull as exc:
        state.metrics.on_rejected(kind, "rejected")
        raise APIError(429, "the worker's queue is full; retry later", code="queue_full",
                       headers={"Retry-After": str(int(exc.retry_after_s))}) from None
    except ShuttingDown:
        raise APIError(503, "the worker is shutting down", code="shutting_down", headers={"Retry-After": "1"}) from None
    return ereq, await _await_or_cancel(request, engine, ereq)


def install_edit_routes(app: FastAPI, state: WorkerState) -> None:
    settings = state.settings
    set_pixel_limit(settings.max_image_size)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        from stepfleet.serving.edits.masks import MaskError, pixel_mask_from_png, whole_image_mask
        from stepfleet.serving.edits.templates import image_digest

        engine, runner = _edit_runner(state)
        form = await _form(request, state, _EDIT_FIELDS)
        template_id = _text(form, "template_id")
        template = None
        if template_id:
            template = runner.templates.get(template_id)
            if template is None:
                raise APIError(404, f"template_id: no template {template_id!r}", param="template_id",
                               code="template_not_found")
            image = template.image
        elif "image" in form:
            image = await asyncio.to_thread(decode_image, form["image"], state)
            template = runner.templates.find(image_digest(image))
        else:
            raise APIError(400, "image: send an image (or a template_id)", param="image", code="missing_parameter")
        if "mask" in form:
            data = form["mask"]
            if not isinstance(data, bytes):
                raise APIError(400, "mask: must be an uploaded PNG", param="mask", code="invalid_value")
            try:
                mask = await asyncio.to_thread(pixel_mask_from_png, data, image.size)
            except MaskError as exc:
                raise APIError(400, exc.message, param="mask", code="invalid_mask") from None
        else:  # OpenAI: without a mask the whole image may change
            mask = whole_image_mask(image.size)
        key = template.key if template is not None else None
        try:
            if _text(form, "response_format") not in (None, "b64_json"):
                raise InvalidParam("response_format", "only 'b64_json' is supported", code="unsupported_value")
            size = _text(form, "size")
            if size not in (None, "auto"):
                w, h = parse_size(size, image.size, state.limits)
                if (w, h) != image.size:
                    raise InvalidParam("size", f"must be the image's size {image.size[0]}x{image.size[1]} "
                                       f"(got {size}); resize before uploading")
            steps = _number(form, "num_inference_steps", int)
            guidance = _number(form, "guidance_scale", float)
            seed = _number(form, "seed", int)
            strength = _number(form, "strength", float)
            params = GenerationParams(
                prompt=_text(form, "prompt") or "",
                width=image.size[0],
                height=image.size[1],
                n=_number(form, "n", int) or 1,
                num_inference_steps=steps if steps is not None else (key.steps if key else settings.default_steps),
                guidance_scale=guidance if guidance is not None else (
                    key.guidance_scale if key else settings.default_guidance_scale),
                negative_prompt=_text(form, "negative_prompt"),
                scheduler=_text(form, "scheduler") or (key.scheduler if key else None),
                seed=seed if seed is not None else (key.seed if key else None),
                deadline_ms=_number(form, "deadline_ms", float),
                output_format=_text(form, "output_format") or "png",
                edit=EditSpec(template_id=template.id if template else None,
                              image=None if template else image, pixel_mask=mask,
                              strength=strength if strength is not None else (key.strength if key else 1.0)),
            )
            params = validate(params, state.limits)
        except InvalidParam as exc:
            raise _invalid(state, exc, "edit") from None
        ereq, result = await _submit(request, state, engine, params, "edit")
        compression = _number(form, "output_compression", int)
        data = await asyncio.to_thread(
            lambda: [{"b64_json": to_b64(im, params.output_format, compression)} for im in result.images])
        path = result.edit_path or "full"
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": data,
                "output_format": params.output_format,
                "size": f"{params.width}x{params.height}",
                "stepfleet": {
                    "request_id": ereq.id, "seed": result.seed, "steps": result.steps,
                    "queue_s": round(result.queue_s, 6), "total_s": round(result.total_s, 6),
                    "edit_path": path, "template_id": template.id if template else None,
                },
            },
            headers={EDIT_PATH_HEADER: path},
        )

    @app.post("/v1/templates")
    async def create_template(request: Request) -> JSONResponse:
        from stepfleet.serving.edits.templates import (
            Template,
            TemplateKey,
            image_digest,
            record_params,
        )

        engine, runner = _edit_runner(state)
        form = await _form(request, state, _TEMPLATE_FIELDS)
        if "image" not in form:
            raise APIError(400, "image: required", param="image", code="missing_parameter")
        image = await asyncio.to_thread(decode_image, form["image"], state)
        try:
            size = _text(form, "size")
            if size not in (None, "auto") and parse_size(size, image.size, state.limits) != image.size:
                raise InvalidParam("size", f"must be the image's size {image.size[0]}x{image.size[1]}")
            scheduler = _text(form, "scheduler") or None
            if scheduler is not None and scheduler not in SCHEDULERS:
                raise InvalidParam("scheduler", f"unknown scheduler {scheduler!r}")
            steps = _number(form, "num_inference_steps", int)
            guidance = _number(form, "guidance_scale", float)
            seed = _number(form, "seed", int)
            strength = _number(form, "strength", float)
            key = TemplateKey(
                width=image.size[0], height=image.size[1],
                steps=steps if steps is not None else settings.default_steps,
                scheduler=scheduler,
                guidance_scale=guidance if guidance is not None else settings.default_guidance_scale,
                seed=seed if seed is not None else 0,
                strength=strength if strength is not None else 1.0,
            )
            template = Template(id=f"tmpl-{secrets.token_hex(8)}", key=key, prompt=_text(form, "prompt") or "",
                                image=image, digest=image_digest(image))
            params = validate(record_params(template, _text(form, "negative_prompt")), state.limits)
        except InvalidParam as exc:
            raise _invalid(state, exc, "template") from None
        for old in runner.templates.add(template):
            runner.cache.drop(old.id)
        try:
            await _submit(request, state, engine, params, "template")
        except BaseException:
            runner.drop_template(template.id)
            raise
        return JSONResponse(template.public(runner.template_cached(template.id, _steps(runner, template))))

    @app.get("/v1/templates")
    async def list_templates() -> dict[str, Any]:
        _, runner = _edit_runner(state)
        return {"object": "list",
                "data": [t.public(runner.template_cached(t.id, _steps(runner, t))) for t in runner.templates.all()]}

    @app.get("/v1/templates/{template_id}")
    async def get_template(template_id: str) -> dict[str, Any]:
        _, runner = _edit_runner(state)
        t = runner.templates.get(template_id)
        if t is None:
            raise APIError(404, f"no template {template_id!r}", param="template_id", code="template_not_found")
        return t.public(runner.template_cached(t.id, _steps(runner, t)))

    @app.delete("/v1/templates/{template_id}")
    async def delete_template(template_id: str) -> dict[str, Any]:
        _, runner = _edit_runner(state)
        if runner.templates.get(template_id) is None:
            raise APIError(404, f"no template {template_id!r}", param="template_id", code="template_not_found")
        runner.drop_template(template_id)
        return {"id": template_id, "object": "template.deleted", "deleted": True}


def _steps(runner, template) -> int:
    """Steps the template's RECORD run took (fewer than `steps` when strength < 1)."""
    return len(template.noised) - 1 if template.noised else template.key.steps
