"""Control images: decoded from base64 (or a multipart part), checked, optionally turned into edges.

The size rule (documented in docs/controlnet.md): a control image may have any size up to twice
the worker's `--max-image-size` per side; one whose aspect ratio is within 1 % of the output's is
resized to the output size exactly as diffusers' ControlNet pipelines resize it (their
`VaeImageProcessor`, Lanczos, in `extension.control_image`), so a 512² edge map drives a 256²
image; any other aspect ratio is refused with a 400 naming `controlnet[i].image`, because a
stretched edge map would put every edge in the wrong place.

`preprocess: "canny"` runs OpenCV's Canny edge detector (`low`/`high` hysteresis thresholds, 100
and 200 by default, the values of diffusers' ControlNet guide) on the decoded image, as that
guide does (`cv2.Canny` on the RGB array), and gives the edges as a white-on-black RGB image: a
client can send a plain photo to a canny-trained net.

Pure (PIL, NumPy, OpenCV; no torch, no HTTP): every rejection is an `InvalidParam`.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import TYPE_CHECKING

from stepfleet.serving.controlnet.spec import ASPECT_TOLERANCE, ControlRequest
from stepfleet.serving.params import ControlSpec, InvalidParam

if TYPE_CHECKING:
    from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")


def decode(data: str | bytes, param: str, max_side: int) -> Image.Image:
    """Base64 text (optionally a `data:` URL) or raw bytes → an RGB image (InvalidParam naming `param`)."""
    from PIL import Image

    if isinstance(data, str):
        text = data.partition(",")[2] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParam(param, "must be a base64-encoded PNG, JPEG or WebP image",
                               code="invalid_image") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in FORMATS:
                raise InvalidParam(param, f"must be PNG, JPEG or WebP (got {img.format})",
                                   code="invalid_image_format")
            if max(img.size) > max_side:
                raise InvalidParam(param, f"{img.size[0]}x{img.size[1]} exceeds {max_side} pixels per side",
                                   code="image_too_large")
            img.load()
    except InvalidParam:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidParam(param, "too many pixels (decompression bomb refused)", code="image_too_large") from None
    except Exception:
        raise InvalidParam(param, "not a readable image", code="invalid_image") from None
    return img.convert("RGB")


def check_aspect(size: tuple[int, int], width: int, height: int, param: str) -> None:
    """The size rule: an aspect ratio within `ASPECT_TOLERANCE` of the output's is resized, others refused."""
    w, h = size
    if abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise InvalidParam(param, f"a {w}x{h} control image cannot drive a {width}x{height} output: its aspect "
                           f"ratio must match the output's (it is resized to the output size, never stretched)",
                           code="invalid_image_size")


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges of `image`, white on black, as RGB (diffusers' ControlNet guide's recipe)."""
    import cv2
    import numpy as np
    from PIL import Image

    edges = cv2.Canny(np.asarray(image), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_spec(req: ControlRequest, width: int, height: int, max_side: int) -> ControlSpec:
    """A checked request entry → the engine's `ControlSpec` (decoded, size-checked, preprocessed)."""
    param = req.param("image")
    image = decode(req.image, param, max_side)
    check_aspect(image.size, width, height, param)
    if req.preprocess == "canny":
        image = canny(image, req.low, req.high)
    return ControlSpec(req.name, image, req.conditioning_scale, req.guidance_start, req.guidance_end)
