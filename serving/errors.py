"""OpenAI-style JSON errors: `{"error": {"message", "type", "param", "code"}}`, one helper for all.

Clients (the official `openai` SDK among them) read `error.message` and `param`; keeping
every rejection in this one shape means a user always learns which field to fix. The worker
and the router share this module, so a body refused by either names its field the same way,
whether it was JSON or a multipart form, and whether pydantic (`validation_error`) or a
worker limit (`params.InvalidParam`) refused it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepfleet.serving.params import InvalidParam

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
#: pydantic error types with a code of their own; everything else is `invalid_value`.
_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_parameter"}


class APIError(Exception):
    """Raise anywhere in a handler to answer with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, headers=exc.headers)


def param_of(loc: Sequence[Any]) -> str | None:
    """The request field an error location blames: its top-level field.

    Locations carry FastAPI's source (`body`) and, inside unions, pydantic's member tags
    (`priority.str`), which name no field a client sends; OpenAI's image endpoints take
    flat bodies, so the top-level name is the field to fix.
    """
    rest = [p for p in loc if p not in ("body", "query", "path", "header")]
    return rest[0] if rest and isinstance(rest[0], str) else None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """pydantic's (or FastAPI's) validation errors → a 400 naming the first one's field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return APIError(400, f"request body is not valid JSON: {detail}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and isinstance(first.get("input"), bytes):  # a body FastAPI did not read as JSON
        return APIError(400, "send a JSON object with `Content-Type: application/json`",
                        code="invalid_content_type")
    param = param_of(loc)
    msg = "unknown field" if kind == "extra_forbidden" else str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"{param or 'request body'}: {msg}", param=param, code=_CODES.get(kind, "invalid_value"))


def invalid_param(exc: InvalidParam) -> APIError:
    """A value the schema allows but this worker cannot serve (limits, combinations) → 400."""
    msg = exc.message if exc.message.startswith(f"{exc.param}:") else f"{exc.param}: {exc.message}"
    return APIError(400, msg, param=exc.param, code=exc.code)


def install_error_handlers(app: Any, on_invalid: Callable[[Request], None] | None = None) -> None:
    """Route FastAPI's own errors (validation, 404, 405), `InvalidParam` and unexpected exceptions
    through the same JSON shape.

    `on_invalid(request)` is told of every request refused as invalid (the worker counts them).
    """

    def refused(request: Request, error: APIError) -> JSONResponse:
        if on_invalid is not None:
            on_invalid(request)
        return error_response(error)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refused(request, validation_error(exc.errors()))

    @app.exception_handler(InvalidParam)
    async def _invalid_param(request: Request, exc: InvalidParam) -> JSONResponse:
        return refused(request, invalid_param(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)  # a bug: still JSON for the client (Starlette logs the traceback)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))
