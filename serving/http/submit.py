"""The one way a request goes through the engine, and the response envelope of images.

Generations, edits and template recordings all end the same way: submit (429 with
`Retry-After` when the queue is full, 503 when shutting down), wait — and if the client
goes away first, cancel, so its batch slot frees at the next step instead of computing
images nobody will read — then map a failure to 500 (503 when cancelled). Keeping that in
one place keeps the three routes from drifting apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.engine import (
    Engine,
    EngineRequest,
    EngineResult,
    QueueFull,
    RequestCancelled,
    ShuttingDown,
)
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.streams import PING_S, StreamedResponse, sse, sse_error
from stepfleet.serving.images import to_b64
from stepfleet.serving.metrics import WorkerMetrics
from stepfleet.serving.params import GenerationParams, InvalidParam, StreamSpec

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
class Described:
    """What a response says of a request besides its images: OpenAI's response fields.

    `quality` is the one that ran (`auto` resolved), `background` is always `opaque` (no
    served model draws alpha), `event` names a stream's events (`image_generation` or
    `image_edit`), `input_images` are the (width, height) of the images an edit or variation
    read, counted in `usage`.
    """

    quality: str = "medium"
    background: str = "opaque"
    output_compression: int | None = None
    event: str = "image_generation"
    input_images: tuple[tuple[int, int], ...] = ()


def latent_tokens(engine: Engine, width: int, height: int) -> int:
    """Tokens of one image: its latent's pixels (for SD: (W/8)·(H/8))."""
    h, w = engine.runner.latent_shape(width, height)[-2:]  # (C, h, w), or (C, 1, h, w) for a video family
    return int(h) * int(w)


def text_tokens(engine: Engine, params: GenerationParams) -> int:
    """Tokens of the prompt and negative prompt, by the model's own tokenizer (words without one)."""
    tokenizer = getattr(getattr(getattr(engine.runner, "backbone", None), "pipe", None), "tokenizer", None)
    texts = [t for t in (params.prompt, params.negative_prompt) if t]
    if tokenizer is None:
        return sum(len(t.split()) for t in texts)
    limit = getattr(tokenizer, "model_max_length", 77)
    return sum(len(tokenizer(t, truncation=True, max_length=limit).input_ids) for t in texts)


def usage(engine: Engine, params: GenerationParams, described: Described) -> dict[str, Any]:
    """OpenAI's `usage`, defined for diffusion (docs/openai-compat.md, "Tokens"): output tokens are
    latent tokens × denoising steps × images, input tokens the prompt's text tokens plus the
    latent tokens of every input image."""
    text = text_tokens(engine, params)
    image = sum(latent_tokens(engine, w, h) for w, h in described.input_images)
    output = latent_tokens(engine, params.width, params.height) * params.num_inference_steps * params.n
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"image_tokens": image, "text_tokens": text},
        "output_tokens": output,
        "total_tokens": text + image + output,
    }


@dataclass(frozen=True)
class Submission:
    """Submits one HTTP request's work to the engine as `kind` and waits for it (see the module)."""

    request: Request
    engine: Engine
    metrics: WorkerMetrics
    kind: RequestKind

    def _submit(self, params: GenerationParams) -> EngineRequest:
        try:
            return self.engine.submit(params, request_id=self.request.state.request_id, kind=self.kind)
        except QueueFull as exc:
            self.metrics.on_rejected(self.kind.value, "rejected")
            raise APIError(429, "the worker's queue is full; retry later", code="queue_full",
                           headers={"Retry-After": str(int(exc.retry_after_s))}) from None
        except ShuttingDown:
            raise APIError(503, "the worker is shutting down", code="shutting_down",
                           headers={"Retry-After": "1"}) from None

    async def __call__(self, params: GenerationParams) -> Done:
        ereq = self._submit(params)
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
        except InvalidParam:  # the model refused a field when preparing (e.g. a DiT's size, a scheduler's kind): 400
            raise
        except Exception as exc:
            log.exception("request %s failed", ereq.id)
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                           code="generation_failed") from None


    async def stream(self, params: GenerationParams, partial_images: int, described: Described,
                     **stepfleet: Any) -> StreamedResponse:
        """Submit `params` streamed: the response is the SSE stream (`streams`) of its partial images
        and its completion. Refusals (a full queue, shutting down) are raised before it starts."""
        loop = asyncio.get_running_loop()
        partials: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def sink(index: int, images: object) -> None:  # on the engine's loop thread
            try:
                loop.call_soon_threadsafe(partials.put_nowait, (index, images))
            except RuntimeError:  # the event loop is gone (shutdown): nobody reads it
                pass

        params = dataclasses.replace(params, stream=StreamSpec(partial_images, sink))
        ereq = self._submit(params)
        fut = asyncio.wrap_future(ereq.future)

        async def cancel_unless_done() -> None:
            if not fut.done():
                self.engine.cancel(ereq.id)
                fut.cancel()
                log.info("stream client went away; cancelled %s", ereq.id)

        async def events() -> AsyncIterator[bytes]:
            fmt, q = params.output_format, described.output_compression
            fields = {"background": described.background, "output_format": fmt, "quality": described.quality,
                      "size": f"{params.width}x{params.height}"}
            waiter: asyncio.Task | None = None
            try:
                while True:
                    if waiter is None:
                        waiter = asyncio.ensure_future(partials.get())
                    done, _ = await asyncio.wait({waiter, fut}, timeout=PING_S, return_when=asyncio.FIRST_COMPLETED)
                    if waiter in done:
                        index, images = waiter.result()
                        waiter = None
                        for b64 in await asyncio.to_thread(_encode_arrays, images, fmt, q):
                            yield sse(f"{described.event}.partial_image",
                                      {"type": f"{described.event}.partial_image", "b64_json": b64,
                                       "created_at": int(time.time()), "partial_image_index": index, **fields})
                        continue
                    if fut in done:
                        break
                    yield b": keep-alive\n\n"
            finally:
                if waiter is not None:
                    waiter.cancel()
            try:
                result = fut.result()
            except RequestCancelled:
                yield sse_error(503, "request was cancelled", "cancelled")
                return
            except InvalidParam as exc:  # refused by the model when prepared (see `__call__`)
                yield sse_error(400, exc.message, exc.code, param=exc.param)
                return
            except Exception as exc:
                log.exception("request %s failed", ereq.id)
                yield sse_error(500, f"generation failed: {type(exc).__name__}: {exc}", "generation_failed")
                return
            used = usage(self.engine, params, described)
            data = await asyncio.to_thread(lambda: [to_b64(im, fmt, q) for im in result.images])
            for b64 in data:
                yield sse(f"{described.event}.completed",
                          {"type": f"{described.event}.completed", "b64_json": b64, "created_at": int(time.time()),
                           **fields, "usage": used,
                           "stepfleet": {"request_id": ereq.id, "seed": result.seed, "steps": result.steps,
                                         "queue_s": round(result.queue_s, 6), "total_s": round(result.total_s, 6),
                                         **stepfleet}})

        return StreamedResponse(events(), on_close=cancel_unless_done)


def _encode_arrays(images: Any, output_format: str, quality: int | None) -> list[str]:
    from PIL import Image

    return [to_b64(Image.fromarray(a), output_format, quality) for a in images]


async def images_body(done: Done, engine: Engine, described: Described, **stepfleet: Any) -> dict[str, Any]:
    """OpenAI's images response (`schemas.ImagesResponse`), plus stepfleet's facts about the run.

    Encoding runs in a thread: a PNG of a large image takes long enough to stall other
    requests' event-loop work.
    """
    p, r = done.params, done.result
    q = described.output_compression
    data = await asyncio.to_thread(lambda: [{"b64_json": to_b64(im, p.output_format, q)} for im in r.images])
    return {
        "created": int(time.time()),
        "data": data,
        "background": described.background,
        "output_format": p.output_format,
        "quality": described.quality,
        "size": f"{p.width}x{p.height}",
        "usage": usage(engine, p, described),
        "stepfleet": {
            "request_id": done.request_id,
            "seed": r.seed,
            "steps": r.steps,
            "queue_s": round(r.queue_s, 6),
            "total_s": round(r.total_s, 6),
            **stepfleet,
        },
    }
