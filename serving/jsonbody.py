"""Reading a JSON request body within bounds: its size, its nesting depth, an object at the top.

Python's `json` parser recurses once per nesting level, so a body of 100,000 `[` raised
`RecursionError` inside the worker and the router: a 500 for what is a client's mistake
(issue 19). No request body of this API nests deeper than two levels (a crop's `[top,
left]`), so a body nested deeper than `MAX_DEPTH` is refused before it is parsed, and the
parser never recurses far. Counting brackets costs two `bytes.count` calls for any body
that could not be that deep; only a body with more brackets than the limit is scanned, by
one regular expression that skips over strings.

Worker and router share this module, so both answer the same errors: 413 for a body over
the size limit (refused as it streams in, never buffered whole), 400 `invalid_json` for
anything that is not a JSON object.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from stepfleet.serving.errors import APIError

#: Deepest nesting a JSON body may have (the API needs 2; room for extension fields).
MAX_DEPTH = 32
#: A JSON string (escapes included; an unterminated one runs to the end, so the scan stays
#: linear however many quotes a body holds), or one bracket: what the depth scan looks at.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_OPEN = frozenset(b"[{")


def nested_deeper_than(body: bytes, limit: int) -> bool:
    """Whether `body` opens more than `limit` arrays/objects at once (brackets inside strings
    do not count). Cheap for ordinary bodies: they hold fewer brackets than the limit."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for match in _TOKENS.finditer(body):
        first = match.group()[0]
        if first in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif first != 0x22:  # a closing bracket (0x22 is the quote that starts a string)
            depth -= 1
    return False


def parse_object(body: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """`body` as a JSON object; 400 `invalid_json` naming what is wrong otherwise."""
    if nested_deeper_than(body, max_depth):
        raise APIError(400, f"request body is not valid JSON for this API: nested deeper than {max_depth} levels",
                       code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


async def read_bounded(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes.

    The declared `Content-Length` is checked before anything is read; a chunked body is
    counted as it arrives. Starlette's cache is filled, so later `request.body()`,
    `request.json()` and `request.form()` calls reuse these bytes.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's cache of the body (read by body(), json() and form())
    return body
