"""The one way a request goes through the engine, and the response envelope of images.

Generations, edits and template recordings all end the same way: submit (429 with
`Retry-After` when the queue is full, 503 when shutting down), wait — and if the client
goes away first, cancel, so its batch slot frees at the next step instead of computing
images nobody will read — then map a failure to 500 (503 when cancelled). Keeping that in
one place keeps the three routes from drifting apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.engine import Engine, EngineResult, QueueFull, RequestCancelled, ShuttingDown
from stepfleet.serving.errors import APIError
from stepfleet.serving.images import to_b64
from stepfleet.serving.metrics import WorkerMetrics
from stepfleet.serving.params import GenerationParams

log = logging.getLogger(__name__)

#: How often a waiting handler checks whether its client went away.
DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class Done:
    """A finished request: what was asked, and what the engine made."""

    request_id: str
    params: GenerationParams
    result: EngineResult


@dataclass(frozen=True)
class Submission:
    """Submits one HTTP request's work to the engine as `kind` and waits for it (see the module)."""

    request: Request
    engine: Engine
    metrics: WorkerMetrics
    kind: RequestKind

    async def __call__(self, params: GenerationParams) -> Done:
        try:
            ereq = self.engine.submit(params, request_id=self.request.state.request_id, kind=self.kind)
        except QueueFull as exc:
            self.metrics.on_rejected(self.kind.value, "rejected")
            raise APIError(429, "the worker's queue is full; retry later", code="queue_full",
                           headers={"Retry-After": str(int(exc.retry_after_s))}) from None
        except ShuttingDown:
            raise APIError(503, "the worker is shutting down", code="shutting_down",
                           headers={"Retry-After": "1"}) from None
        fut = asyncio.wrap_future(ereq.future)
        while not (await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S))[0]:
            if await self.request.is_disconnected():
                self.engine.cancel(ereq.id)
                fut.cancel()  # nobody will read its outcome now
                log.info("client went away; cancelled %s", ereq.id)
                raise APIError(499, "client closed request", code="client_closed")
        try:
            return Done(ereq.id, params, fut.result())
        except RequestCancelled:
            raise APIError(503, "request was cancelled", code="cancelled") from None
        except Exception as exc:
            log.exception("request %s failed", ereq.id)
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                           code="generation_failed") from None


async def images_body(done: Done, output_compression: int | None, **stepfleet: Any) -> dict[str, Any]:
    """OpenAI's images response (`schemas.ImagesResponse`), plus stepfleet's facts about the run.

    Encoding runs in a thread: a PNG of a large image takes long enough to stall other
    requests' event-loop work.
    """
    p, r = done.params, done.result
    data = await asyncio.to_thread(
        lambda: [{"b64_json": to_b64(im, p.output_format, output_compression)} for im in r.images])
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": p.output_format,
        "size": f"{p.width}x{p.height}",
        "stepfleet": {
            "request_id": done.request_id,
            "seed": r.seed,
            "steps": r.steps,
            "queue_s": round(r.queue_s, 6),
            "total_s": round(r.total_s, 6),
            **stepfleet,
        },
    }
