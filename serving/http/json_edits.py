"""`POST /v1/images/edits` with a JSON body: OpenAI's `images: [{"image_url": ...}]`, served as the form.

OpenAI's edits take a multipart form or a JSON body whose images are references (`data:` URLs,
or URLs the server fetches). Rather than a second edit pipeline, the JSON body becomes the
form the edit route already serves: `EditRoute` reads it within `--max-upload-bytes`, checks
it with `ImageEditJSON` (strict JSON types, 400 naming the field: more than 16 `images`, a
`file_id`, an unknown field), turns each reference into bytes (`serving.image_refs`: data
URLs always, remote URLs only where enabled), checks that each is an image (400 naming
`images`, before the engine sees anything), and hands FastAPI the equivalent form (the
images as `image[]`, the mask as `mask`). From there the edit is the multipart edit: the
same mask checks (400 naming `mask`), template matching, streaming and response.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.requests import Request

from stepfleet.serving.errors import APIError, validation_error
from stepfleet.serving.http.deps import worker_state
from stepfleet.serving.http.uploads import UploadRoute, decode_image
from stepfleet.serving.image_refs import ImageRefError, RemotePolicy, load, parse_networks
from stepfleet.serving.jsonbody import parse_object, read_bounded
from stepfleet.serving.params import Limits
from stepfleet.serving.schemas import ImageEditJSON, ImageReference
from stepfleet.serving.settings import WorkerSettings


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def remote_policy(settings: WorkerSettings) -> RemotePolicy:
    """The worker's rules for remote image URLs (off unless `--remote-image-urls`)."""
    return RemotePolicy(enabled=settings.remote_image_urls, timeout_s=settings.remote_image_timeout_s,
                        max_bytes=settings.max_upload_bytes, allowed=parse_networks(settings.remote_image_networks))


class EditRoute(UploadRoute):
    """The edit route: a multipart form as `UploadRoute` checks it, or a JSON body turned into that form."""

    async def check_body(self, request: Request, limit: int) -> None:
        if not is_json(request.headers.get("content-type", "")):
            await super().check_body(request, limit)
            return
        state = await worker_state(request)
        request._form = await form_of(request, state.settings, state.limits)  # Starlette's cache: FastAPI reads it


async def form_of(request: Request, settings: WorkerSettings, limits: Limits) -> FormData:
    """The multipart form equivalent to the request's JSON edit body."""
    body = await read_bounded(request, settings.max_upload_bytes)
    try:
        edit = ImageEditJSON.model_validate(parse_object(body))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    if not edit.images and edit.template_id is None:
        raise APIError(400, "images: send images (or a template_id)", param="images", code="missing_parameter")
    policy = remote_policy(settings)
    items: list[tuple[str, str | UploadFile]] = [
        (name, _text(value)) for name, value in
        edit.model_dump(mode="json", exclude={"images", "mask"}, exclude_none=True).items()
    ]
    for i, ref in enumerate(edit.images or ()):
        where = f"images[{i}].image_url"
        data = await _bytes_of(ref, "images", where, policy)
        try:
            await asyncio.to_thread(decode_image, data, limits, "images")
        except APIError as exc:
            raise APIError(exc.status, exc.message.replace("images:", f"{where}:", 1), param="images",
                           code=exc.code) from None
        items.append(("image[]", _upload(data, f"image-{i}")))
    if edit.mask is not None:
        items.append(("mask", _upload(await _bytes_of(edit.mask, "mask", "mask.image_url", policy), "mask")))
    return FormData(items)


async def _bytes_of(ref: ImageReference, param: str, where: str, policy: RemotePolicy) -> bytes:
    assert ref.image_url is not None  # the schema requires it
    try:
        return await load(ref.image_url, policy)
    except ImageRefError as exc:
        raise APIError(exc.status, f"{where}: {exc.message}", param=param, code=exc.code) from None


def _upload(data: bytes, name: str) -> UploadFile:
    return UploadFile(io.BytesIO(data), size=len(data), filename=name,
                      headers=Headers({"content-type": "application/octet-stream"}))


def _text(value: Any) -> str:
    """A checked JSON value as form text that the form model reads back as the same value (lists
    and objects, e.g. `lora`, as JSON text, which is how forms carry them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):  # e.g. `controlnet`: the form reads it back as JSON text
        import json

        return json.dumps(value)
    return str(value)
