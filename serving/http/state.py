"""What the worker's routes share: settings and limits, metrics, and the engine once it is ready.

The engine (and the template service, when the model can do edits) is set by the loader
thread while the server already answers `/healthz`; `ready` is set only after that, so a
route that sees `ready` sees both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.controlnet.spec import ControlNetEntry, registered
from stepfleet.serving.engine import Engine
from stepfleet.serving.metrics import WorkerMetrics
from stepfleet.serving.params import Limits
from stepfleet.serving.settings import WorkerSettings

if TYPE_CHECKING:
    from stepfleet.serving.adapters.registry import AdapterRegistry
    from stepfleet.serving.compiled.denoiser import CompiledDenoiser
    from stepfleet.serving.compiled.metrics import CompileMetrics
    from stepfleet.serving.edits.service import TemplateService
    from stepfleet.serving.videos.service import VideoService

#: The size `size: "auto"` means when the runner does not say (test runners without a model).
FALLBACK_SIZE = (256, 256)


def worker_limits(settings: WorkerSettings, max_batch: int) -> Limits:
    """The request limits a worker enforces, its engine batching `max_batch` images per step.

    `n` is capped by `max_batch` too: a request's images share one step's batch, so a
    request of more images than a batch holds would never be admitted (and, first in its
    shape's queue, would hold back every request behind it).
    """
    return Limits(
        max_image_size=settings.max_image_size,
        max_steps=settings.max_steps,
        max_images=min(settings.max_images, max_batch),
    )


@dataclass
class WorkerState:
    settings: WorkerSettings
    metrics: WorkerMetrics
    limits: Limits
    engine: Engine | None = None
    #: Templates and edits; None while loading, or when the model has no masked compute.
    templates: TemplateService | None = None
    #: `size: "auto"`: the model's native size (set with the engine).
    default_size: tuple[int, int] = FALLBACK_SIZE
    ready: threading.Event = field(default_factory=threading.Event)
    #: Why loading failed (`"FamilyMismatch: ..."`), reported on /readyz.
    load_error: str | None = None
    #: The denoiser compiled per shape bucket (`--compile`): warm-up progress on /readyz, metrics.
    compiled: CompiledDenoiser | None = None
    compile_metrics: CompileMetrics | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, settings: WorkerSettings, max_batch: int) -> WorkerState:
        return cls(settings=settings, metrics=WorkerMetrics(pool=settings.pool),
                   limits=worker_limits(settings, max_batch))

    #: Whether `stream: true` can be served: the runner renders partial images (`serving.previews`).
    streaming: bool = False
    #: The ControlNets requests may name (those of the runner's ControlNet extension).
    controlnets: tuple[ControlNetEntry, ...] = ()
    #: LoRA adapters (`/v1/adapters`, `lora` on requests); None while loading or when the runner has none.
    adapters: AdapterRegistry | None = None
    #: Video jobs (`/v1/videos`); set by the app factory, served only by a video model (`serving.videos`).
    videos: VideoService | None = None

    def use(self, engine: Engine, templates: TemplateService | None, default_size: tuple[int, int]) -> None:
        """Serve with `engine` (the metrics observe it) once `mark_ready` is called; its runner gets
        the previews extension that streamed requests need."""
        from stepfleet.serving.previews import install

        engine.observer = self.metrics
        self.engine, self.templates, self.default_size = engine, templates, default_size
        self.streaming = install(engine.runner) is not None
        self.controlnets = registered(engine.runner)

    def mark_ready(self) -> None:
        self.metrics.ready.labels(self.settings.pool).set(1)
        self.ready.set()

    def load_headers(self) -> dict[str, str]:
        """The router's balancing signal, sent on every response."""
        if self.engine is None:
            return {}
        load = self.engine.load()
        return {
            "X-Stepfleet-Backlog-Seconds": f"{load['backlog_s']:.3f}",
            "X-Stepfleet-Step-Units": f"{load['step_units']:.0f}",
        }

    def count_invalid(self, request: Request) -> None:
        """Count a request refused as invalid under the kind its route declared (`deps.Submit*`).

        A body that cannot be read at all (not JSON, not a form) is refused before the route's
        dependencies run, so before its kind is known: it is not counted.
        """
        kind = getattr(request.state, "kind", None)
        if isinstance(kind, RequestKind):
            self.metrics.on_rejected(kind.value, "invalid")
