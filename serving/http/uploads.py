"""Multipart uploads: refused by their headers before any byte is read, then decoded and checked.

Every bad upload is an error naming its field, before anything reaches the engine:

- `UploadRoute` checks a route's upload before FastAPI parses it: no `Content-Length` is
  411, more than `max_upload_bytes` is 413 (naming `image`), a body that is not a form is
  400, a malformed multipart body is 400 (`invalid_multipart`);
- `read_image`: an image over the size limit is 413, one that is not a PNG/JPEG/WebP, is
  unreadable, or whose sides are not multiples of 8 is 400; Pillow's pixel limit is set from
  the size limit (`set_pixel_limit`) and its warning is an error here, so a decompression
  bomb is refused before it is decoded;
- `read_mask`: a mask that is not a PNG, has no alpha, or differs in size from the image is
  400 naming `mask`.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import UploadFile
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from stepfleet.serving.errors import APIError
from stepfleet.serving.http.deps import worker_state
from stepfleet.serving.params import Limits

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def set_pixel_limit(max_image_size: int) -> None:
    """Refuse images with more pixels than a square of twice the size limit (decompression bombs).

    Pillow's limit is process-wide; the worker serves one model, so it has one size limit.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = (2 * max_image_size) ** 2


class UploadRoute(APIRoute):
    """A route whose form body is checked by its headers, then parsed once, before FastAPI reads it.

    FastAPI parses a form body before it resolves any dependency, so these checks cannot be
    dependencies; FastAPI then reuses the form parsed here (Starlette caches it).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            state = await worker_state(request)
            await self.check_body(request, state.settings.max_upload_bytes)
            return await handler(request)

        return checked

    async def check_body(self, request: Request, limit: int) -> None:
        """Refuse the body (or, in a subclass, turn another body into the form); then it is parsed."""
        await check_upload(request, limit)


async def check_upload(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise APIError(411, "a Content-Length is required for uploads", code="length_required")
    if int(length) > limit:
        raise APIError(413, f"upload of {int(length)} bytes exceeds the limit of {limit} bytes", param="image",
                       code="too_large")
    if not request.headers.get("content-type", "").startswith(FORM_TYPES):
        raise APIError(400, "send multipart/form-data (image, mask, prompt, ...)", code="invalid_content_type")
    try:
        await request.form()
    except Exception as exc:
        detail = getattr(exc, "detail", exc)
        raise APIError(400, f"malformed multipart body: {detail}", code="invalid_multipart") from None


async def read_image(upload: UploadFile, limits: Limits, param: str = "image") -> Image.Image:
    """An uploaded image → RGB, of an allowed size (413 when too large, 400 when unusable)."""
    data = await upload.read()
    return await asyncio.to_thread(decode_image, data, limits, param)


def decode_image(data: bytes, limits: Limits, param: str = "image") -> Image.Image:
    from PIL import Image

    limit = limits.max_image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in IMAGE_FORMATS:
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
    if w % 8 or h % 8 or min(w, h) < limits.min_image_size:
        raise APIError(400, f"{param}: width and height must be multiples of 8 and at least "
                       f"{limits.min_image_size} (got {w}x{h})", param=param, code="invalid_image_size")
    return img.convert("RGB")


async def read_mask(upload: UploadFile | None, size: tuple[int, int]) -> torch.Tensor:
    """The edit area as an (H, W) bool tensor: the mask's transparent pixels, or (no mask, as
    OpenAI's API) the whole image."""
    from stepfleet.serving.edits.masks import MaskError, pixel_mask_from_png, whole_image_mask

    if upload is None:
        return whole_image_mask(size)
    data = await upload.read()
    try:
        return await asyncio.to_thread(pixel_mask_from_png, data, size)
    except MaskError as exc:
        raise APIError(400, exc.message, param="mask", code="invalid_mask") from None
