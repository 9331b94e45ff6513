"""Request-id propagation as a pure ASGI middleware.

Pure ASGI (not `@app.middleware("http")`) because Starlette's BaseHTTPMiddleware wraps
`receive`, which hides the client's disconnect from handlers; the worker relies on seeing
it to free a batch slot at the next step.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"


class RequestIdMiddleware:
    """Take the caller's X-Request-Id (or make one), expose it to handlers, echo it back."""

    def __init__(self, app: ASGIApp, extra_headers: Callable[[], dict[str, str]] | None = None) -> None:
        self.app = app
        self.extra_headers = extra_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = list(message.get("headers", []))
                out.append((b"x-request-id", rid.encode("latin-1")))
                if self.extra_headers is not None:
                    out += [(k.lower().encode(), v.encode()) for k, v in self.extra_headers().items()]
                message["headers"] = out
            await send(message)

        await self.app(scope, receive, send_with_id)
