"""Request and response bodies of the public Images API (OpenAI's fields plus stepfleet's).

Unknown fields are rejected, as OpenAI does, so a typo (`num_inference_step`) is an error
that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = "auto"
    response_format: str | None = "b64_json"
    output_format: str | None = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    # Accepted for compatibility with OpenAI clients; they do not change a diffusion model's output.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    # stepfleet extensions
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None
    priority: str | int | None = None
    deadline_ms: float | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class StepfleetInfo(BaseModel):
    request_id: str
    seed: int
    steps: int
    queue_s: float
    total_s: float


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    stepfleet: StepfleetInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stepfleet"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
