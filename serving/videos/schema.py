"""The body of `POST /v1/videos`, as one pydantic model the worker checks and both sides document.

OpenAI's fields first (`prompt`, `model`, `seconds`, `size`, `input_reference`), then
stepfleet's. The official SDK sends multipart form fields (strings), so numbers are read in
pydantic's lax mode ("9" is 9); unknown fields are refused, naming them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class VideoCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what the video shows")
    model: str | None = Field(default=None, description="the served model's name")
    seconds: str | float | None = Field(default=None, description="clip length in seconds (OpenAI: '4', '8', '12'); "
                                                          "frames = seconds x fps, rounded up to a count the model takes")
    size: str | None = Field(default=None, pattern=r"^\d+x\d+$", description="WxH (default: the model's own size)")
    input_reference: str | None = Field(default=None, description="image-to-video reference (not supported: 400)")
    num_frames: int | None = Field(default=None, ge=1, description="frames (wins over seconds); 4k + 1 for Wan")
    fps: int | None = Field(default=None, ge=1, le=60, description="frame rate of the MP4 (default 16, Wan's)")
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    seed: int | None = Field(default=None, ge=0)
    guidance_scale: float | None = Field(default=None, ge=0, le=50)
    negative_prompt: str | None = None
    priority: str | int | None = Field(default=None, description="low, normal or high")
    deadline_ms: float | None = Field(default=None, gt=0, description="finish within this many ms of arrival")


def documented_form() -> dict[str, Any]:
    """`openapi_extra` documenting the body as OpenAI's SDK sends it (multipart form fields)."""
    schema = VideoCreateBody.model_json_schema()
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
