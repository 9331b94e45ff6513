"""Server-Sent Events for streamed images (`stream: true`), as OpenAI's SDK types define them.

A streamed generation answers `text/event-stream`: up to `partial_images` events
`image_generation.partial_image` (`b64_json`, `partial_image_index`, `created_at`, `size`,
`quality`, `background`, `output_format`), then one `image_generation.completed` (the same,
without the index, with `usage`); edits and variations say `image_edit.*`. Each event is
`event: NAME` and `data: JSON` with the same `type`, which is how the `openai` client reads
them. A failure after the stream began is one event `data: {"error": {...}}`, which the client
raises as an `APIError`; a failure before it (a bad field, a full queue) is the usual JSON
error with its status.

`StreamedResponse` is shared with the router, which relays a worker's stream through it. It
is Starlette's streaming response plus what both need: it watches for the client's
disconnect *while waiting* for the next event (Starlette notices only when it writes, and a
request without previews writes once, at the end), and its `on_close` runs however the
response ends — the worker cancels the request there (its batch slot frees at the next step),
the router closes the upstream connection and gives back the worker's in-flight slot.
Starlette's own response is used, not sse-starlette: the framing is three lines, and the
disconnect and cleanup rules above are ours either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
#: Seconds between keep-alive comments while a request waits or steps without previews.
PING_S = 10.0


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One SSE event: `event:` names it, `data:` carries the JSON (one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sse_error(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    """A failure after the stream began, in the shape the `openai` client raises."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class StreamedResponse(Response):
    """Streams `chunks` as they come; stops when the client leaves; `on_close` runs on every exit."""

    def __init__(self, chunks: AsyncIterator[bytes], *, status_code: int = 200,
                 headers: list[tuple[str, str]] | dict[str, str] | None = None, media_type: str = EVENT_STREAM,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        self.init_headers(dict(pairs) if pairs else None)
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive))
        pump = asyncio.ensure_future(self._pump(send))
        try:
            done, _ = await asyncio.wait({watcher, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                pump.result()
            else:
                self.disconnected = True
        finally:
            for task in (watcher, pump):
                task.cancel()
            for task in (watcher, pump):
                with contextlib.suppress(BaseException):
                    await task
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self.on_close is not None:
                await self.on_close()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            self.disconnected = True
