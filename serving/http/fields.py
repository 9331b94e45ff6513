"""Checks of request fields that a schema cannot express, shared by the routes.

Each raises `InvalidParam` naming the field (a 400, counted as invalid under the route's
kind) or an `APIError` with its own status.
"""

from __future__ import annotations

from stepfleet.serving.errors import APIError
from stepfleet.serving.params import InvalidParam, Limits, parse_size
from stepfleet.serving.settings import WorkerSettings


def check_model(model: str | None, settings: WorkerSettings) -> None:
    """`model`, when sent, must name the served model (404 otherwise, as OpenAI answers)."""
    served = settings.public_model_name()
    if model is not None and model != served:
        raise APIError(404, f"model {model!r} is not served here (serving {served!r})", param="model",
                       code="model_not_found")


def check_stream(stream: bool | None, n: int, available: bool) -> None:
    """`stream: true` takes one image (OpenAI's events carry no image index) and a worker whose
    runner renders previews (every model-backed worker; test runners may not)."""
    if not stream:
        return
    if n != 1:
        raise InvalidParam("n", f"stream: true makes one image per request (got n={n}); send n=1",
                           code="unsupported_value")
    if not available:
        raise InvalidParam("stream", "this worker cannot stream partial images", code="unsupported_value")


def check_image_size(size: str | None, image_size: tuple[int, int], limits: Limits) -> None:
    """An edit's or template's `size` is its image's (or `auto`): images are not resized here."""
    if size in (None, "auto"):
        return
    if parse_size(size, image_size, limits) != image_size:
        w, h = image_size
        raise InvalidParam("size", f"must be the image's size {w}x{h} (got {size}); resize before uploading")
