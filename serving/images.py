"""Encoding generated images for the API (PNG, JPEG, WebP as base64), with Pillow."""

from __future__ import annotations

import base64
import io
from typing import Any

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Any, output_format: str = "png", quality: int | None = None) -> bytes:
    """A PIL image → file bytes in `output_format`."""
    buf = io.BytesIO()
    fmt = _PIL_FORMATS[output_format]
    kwargs: dict[str, Any] = {}
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = 90 if quality is None else quality  # 0 is a quality too
        image = image.convert("RGB")
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def to_b64(image: Any, output_format: str = "png", quality: int | None = None) -> str:
    return base64.b64encode(encode_image(image, output_format, quality)).decode("ascii")
