"""Routes whose JSON body is read within bounds before FastAPI parses it.

FastAPI reads a whole JSON body and hands it to `json.loads` before any dependency runs: a
body of any size is buffered, and one nested 100,000 levels deep overflows the parser's
recursion (issue 19). `JSONRoute` reads the body first, refusing it with 413 past
`--max-json-bytes` and with 400 when it is not a JSON object of bounded depth
(`serving.jsonbody`), then leaves the parsed object where FastAPI looks for it (Starlette's
`request._json`), so the body is read and parsed once.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from stepfleet.serving.http.deps import worker_state
from stepfleet.serving.jsonbody import parse_object, read_bounded


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def bounded(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if content_type is None or _is_json(content_type):  # others: FastAPI's own refusal
                state = await worker_state(request)
                body = await read_bounded(request, state.settings.max_json_bytes)
                if body:
                    request._json = parse_object(body)
            return await handler(request)

        return bounded
