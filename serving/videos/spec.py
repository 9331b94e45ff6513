"""A video request's fields → engine parameters, checked against the model's limits (pure).

OpenAI's Videos API names a clip by `seconds` (a string: "4", "8", "12") and `size` ("WxH");
a diffusion model counts frames. We take `num_frames` when it is given, else `seconds × fps`
rounded up to a frame count the model's VAE takes (Wan: 4k + 1, its temporal factor), and
report `seconds` back as frames / fps. Every refusal names its field (`InvalidParam`), so the
route answers 400 with OpenAI's `param` before a job exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from stepfleet.serving.params import GenerationParams, InvalidParam, Limits, Priority, parse_size

#: OpenAI's default clip length, seconds.
DEFAULT_SECONDS = 4.0


@dataclass(frozen=True)
class VideoLimits:
    """A worker's guard rails for videos; frames and seconds bound a job's memory and time."""

    max_frames: int = 81  # Wan 2.1's own clip length (5 s at 16 fps)
    max_seconds: float = 12.0
    default_fps: int = 16  # Wan 2.1's frame rate
    max_fps: int = 60
    #: The VAE's temporal factor: valid frame counts are k·factor + 1 (Wan: 4).
    temporal_factor: int = 4


@dataclass(frozen=True)
class VideoRequest:
    """A validated video job: its engine parameters and what the job reports back."""

    params: GenerationParams
    model: str
    fps: int
    seconds: str  # as reported: frames / fps, e.g. "4" or "0.56"

    @property
    def size(self) -> str:
        return f"{self.params.width}x{self.params.height}"


def _number(fields: Mapping[str, object], name: str, kind: type) -> float | int | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidParam(name, f"must be a number (got {value!r})")
    try:
        number = kind(value) if kind is float else int(str(value))
    except (TypeError, ValueError):
        raise InvalidParam(name, f"must be {'an integer' if kind is int else 'a number'} (got {value!r})") from None
    if kind is float and not math.isfinite(number):
        raise InvalidParam(name, f"must be a finite number (got {value!r})")
    return number


def frames_for(seconds: float, fps: int, factor: int) -> int:
    """The fewest valid frames (k·factor + 1) that last at least `seconds` at `fps`."""
    wanted = max(1, math.ceil(seconds * fps - 1e-9))
    return ((max(0, wanted - 1) + factor - 1) // factor) * factor + 1


def seconds_label(frames: int, fps: int) -> str:
    value = frames / fps
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def parse_video(fields: Mapping[str, object], *, model: str, default_size: tuple[int, int], limits: Limits,
                video: VideoLimits, default_steps: int, default_guidance: float) -> VideoRequest:
    """Check a POST /v1/videos body (JSON or form fields as strings) and build its request."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidParam("prompt", "must be a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidParam("prompt", f"must be at most {limits.max_prompt_chars} characters")
    asked_model = fields.get("model")
    if asked_model not in (None, "", model):
        raise InvalidParam("model", f"this worker serves {model!r} (got {asked_model!r})", code="model_not_found")
    if fields.get("input_reference") not in (None, ""):
        raise InvalidParam("input_reference", "image-to-video is not supported by this model",
                           code="unsupported_value")
    size = fields.get("size")
    width, height = parse_size(size if isinstance(size, str) or size is None else str(size), default_size, limits)
    fps = _number(fields, "fps", int)
    fps = video.default_fps if fps is None else int(fps)
    if not 1 <= fps <= video.max_fps:
        raise InvalidParam("fps", f"must be between 1 and {video.max_fps} (got {fps})")
    frames = _number(fields, "num_frames", int)
    seconds = _number(fields, "seconds", float)
    if seconds is not None and not 0 < seconds <= video.max_seconds:
        raise InvalidParam("seconds", f"must be more than 0 and at most {video.max_seconds:g} for this model "
                                      f"(got {fields.get('seconds')!r})")
    if frames is None:
        frames = frames_for(DEFAULT_SECONDS if seconds is None else float(seconds), fps, video.temporal_factor)
        if frames > video.max_frames:
            raise InvalidParam("seconds", f"{seconds_label(frames, fps)} s at {fps} fps is {frames} frames; this "
                                          f"model makes at most {video.max_frames}")
    frames = int(frames)
    if not 1 <= frames <= video.max_frames:
        raise InvalidParam("num_frames", f"must be between 1 and {video.max_frames} (got {frames})")
    if (frames - 1) % video.temporal_factor:
        raise InvalidParam("num_frames", f"must be 1 more than a multiple of {video.temporal_factor} "
                                         f"(got {frames})")
    steps = _number(fields, "num_inference_steps", int)
    guidance = _number(fields, "guidance_scale", float)
    seed = _number(fields, "seed", int)
    deadline = _number(fields, "deadline_ms", float)
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InvalidParam("negative_prompt", "must be a string")
    priority = fields.get("priority")
    if isinstance(priority, str) and priority.strip().isdigit():  # a form field's "2"
        priority = int(priority)
    params = GenerationParams(
        prompt=prompt, width=width, height=height, n=1, num_frames=frames,
        num_inference_steps=default_steps if steps is None else int(steps),
        guidance_scale=default_guidance if guidance is None else float(guidance),
        negative_prompt=negative or None, seed=None if seed is None else int(seed),
        priority=Priority.parse(priority if isinstance(priority, (str, int)) or priority is None else str(priority)),
        deadline_ms=None if deadline is None else float(deadline),
    )
    return VideoRequest(params=params, model=model, fps=fps, seconds=seconds_label(frames, fps))
