"""The engine ⇄ runner contract: typed values passed between the step loop and the model.

The engine plans and retires work; the runner owns tensors. What crosses between them is
this module's small, typed vocabulary, so the engine can be tested with a fake runner and
never needs torch (nothing here imports it at run time):

- `Runner.prepare(params, seed) -> Prepared[S]`: a request encoded and given its initial
  noise. `S` is the runner's own per-request state (latents, scheduler, generator), opaque
  to the engine; the rest is what the planner needs (latent shape, rows per step, steps,
  how its steps are priced).
- `Runner.step(batch: Sequence[S])`: one denoising step for all of them in one model call.
  The engine wraps it (isolating failures) into a `StepResult`, which
  `planner.update(plan, result)` turns into retirements — the one place finished and
  failed work leaves the batch, shared with the benchmark replay.
- `Runner.decode(state) -> Decoded`: images (and, on request, final latents).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from stepfleet.serving.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    ImageBatch = list[Image.Image] | np.ndarray

#: A latent's (channels, height, width), or (channels, frames, height, width) for a video:
#: requests batch together only when theirs match (the engine uses it only as a hashable key).
Shape = tuple[int, ...]

S = TypeVar("S")


class EditPath(enum.Enum):
    """How an edit ran, reported to its client in `X-Stepfleet-Edit-Path`."""

    CACHED = "cached"  # masked compute on the template's cached activations
    FULL = "full"  # full compute (settings differ from the template's, or its cache was evicted)


#: Cost variant of steps that run masked compute on cached activations (priced apart).
CACHED_EDIT_VARIANT = "cached-edit"


@dataclass(frozen=True)
class Prepared(Generic[S]):
    """A request ready for its first step: the planner's facts plus the runner's state."""

    state: S
    shape: Shape
    #: Rows it adds to one model call: its images, doubled by classifier-free guidance.
    unet_rows: int
    #: Denoising steps it will run (fewer than asked when an edit's `strength` < 1 skips some).
    steps: int
    #: Steps priced apart from plain ones of the same shape (`CACHED_EDIT_VARIANT`), or None.
    cost_variant: str | None = None


@dataclass(frozen=True)
class StepResult:
    """What one executed step did: who advanced a step, who failed and why, how long it took."""

    stepped: tuple[str, ...]
    failed: Mapping[str, BaseException] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Decoded:
    """A finished request's output."""

    images: ImageBatch  # PIL images, or float arrays (n, H, W, 3) for exact comparisons
    #: Final latents on the CPU when the caller asked for them (equality checks), else None.
    latents: torch.Tensor | None = None
    edit_path: EditPath | None = None


class Runner(Protocol[S]):
    """What the engine needs from a model runner (`runner.ModelRunner`; tests pass fakes)."""

    @property
    def device_type(self) -> str: ...

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) a request without `size` gets."""
        ...

    def latent_shape(self, width: int, height: int) -> Shape: ...

    def request_shape(self, params: GenerationParams) -> Shape:
        """A request's latent shape before it is prepared (a video's has its frames): what the
        backlog prices a queued request by, so a video is not counted as one image."""
        ...

    def prepare(self, params: GenerationParams, seed: int) -> Prepared[S]: ...

    def step(self, batch: Sequence[S]) -> None: ...

    def decode(self, state: S, keep_latents: bool = False) -> Decoded: ...


class RequestKind(str, enum.Enum):
    """What a request is for; the `kind` label of the worker's request metrics."""

    GENERATION = "generation"
    EDIT = "edit"
    TEMPLATE = "template"  # a template's RECORD run
    VIDEO = "video"  # a job of the Videos API (`serving.videos`)
    WARMUP = "warmup"
