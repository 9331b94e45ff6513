"""`/v1/adapters`: register, list, show and forget LoRA adapters; `lora` on image requests.

`POST /v1/adapters` is multipart: `name` and either `file` (a safetensors upload, at most
`--max-adapter-bytes`: larger is 413 before a byte is read) or `source` (`hf://repo[/file]`,
`pvc://path` or a local path). The file is checked against the served model on arrival:
not safetensors → 400, a key the denoiser cannot take (another family, other shapes, text
encoder keys) → 422 naming the key. Parsing runs on a thread; the registry is thread-safe.

For a request's `lora` (`lora_spec`, `AdapterHold`): more adapters than
`--max-adapters-per-request` → 400, an unknown name → 404 naming it. The hold pins the
adapters from arrival to answer (so they load while the request queues, and a DELETE cannot
take them from under it) and, with `lora_wait: "full"`, waits for their loads before the
request is submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from stepfleet.serving.adapters.lora import AdapterError
from stepfleet.serving.adapters.registry import UPLOAD, AdapterEntry, AdapterLease, AdapterRegistry
from stepfleet.serving.errors import APIError
from stepfleet.serving.http.deps import ReadyEngine, State, worker_state
from stepfleet.serving.http.openapi import ADAPTER_ERRORS
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.params import InvalidParam, LoraRef, LoraSpec
from stepfleet.serving.schemas import (
    AdapterDeleted,
    AdapterForm,
    AdapterList,
    AdapterObject,
    LoraItem,
)

#: Form fields beside the file: a multipart body may exceed the file's bound by this much.
FORM_OVERHEAD_BYTES = 64 * 1024


class AdapterUploadRoute(APIRoute):
    """Refuses an upload over `--max-adapter-bytes` by its `Content-Length`, before reading it (413)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method == "POST":
                limit = (await worker_state(request)).settings.max_adapter_bytes
                length = request.headers.get("content-length")
                if length is None or not length.isdigit():
                    raise APIError(411, "a Content-Length is required for uploads", code="length_required")
                if int(length) > limit + FORM_OVERHEAD_BYTES:
                    raise APIError(413, f"adapter upload of {int(length)} bytes exceeds --max-adapter-bytes "
                                   f"({limit})", param="file", code="adapter_too_large")
            return await handler(request)

        return checked


router = APIRouter(tags=["adapters"], route_class=AdapterUploadRoute)


async def adapter_registry(state: State, _: ReadyEngine) -> AdapterRegistry:
    if state.adapters is None:
        raise APIError(501, "this worker serves no LoRA adapters", code="adapters_unsupported")
    return state.adapters


Adapters = Annotated[AdapterRegistry, Depends(adapter_registry)]


def public(entry: AdapterEntry) -> dict[str, Any]:
    return {"id": entry.name, "object": "adapter", "created": entry.created, "source": entry.source,
            "bytes": entry.file_bytes, "sha256": entry.digest, "rank": entry.rank, "modules": entry.modules,
            "tiers": entry.tiers(), "in_use": entry.pins}


def adapter_error(exc: AdapterError, param: str) -> APIError:
    return APIError(exc.status, exc.message, param=param, code=exc.code)


@router.post("/v1/adapters", response_model=AdapterObject, responses=ADAPTER_ERRORS)
async def create_adapter(form: Annotated[AdapterForm, Form(media_type="multipart/form-data")], adapters: Adapters,
                         state: State) -> dict[str, Any]:
    """Register a LoRA adapter, checked against the served model (a replaced name must be idle)."""
    from stepfleet.serving.adapters.sources import read_source

    limit = state.settings.max_adapter_bytes
    if (form.file is None) == (form.source is None):
        raise APIError(400, "send exactly one of `file` (an upload) and `source`", param="file",
                       code="missing_parameter")
    param = "file" if form.file is not None else "source"
    try:
        if form.file is not None:
            data = await form.file.read(limit + 1)
            if len(data) > limit:
                raise AdapterError(413, f"adapter file exceeds --max-adapter-bytes ({limit})", code="adapter_too_large")
            source = UPLOAD
        else:
            assert form.source is not None
            data = await asyncio.to_thread(read_source, form.source, limit, state.settings.local_files_only)
            source = form.source
        entry = await asyncio.to_thread(adapters.add, form.name, data, source)
    except AdapterError as exc:
        raise adapter_error(exc, "name" if exc.code in ("invalid_name", "adapter_in_use") else param) from None
    return public(entry)


@router.get("/v1/adapters", response_model=AdapterList, responses=ADAPTER_ERRORS)
async def list_adapters(adapters: Adapters) -> dict[str, Any]:
    return {"object": "list", "data": [public(e) for e in adapters.all()]}


@router.get("/v1/adapters/{name}", response_model=AdapterObject, responses=ADAPTER_ERRORS)
async def get_adapter(name: str, adapters: Adapters) -> dict[str, Any]:
    entry = adapters.get(name)
    if entry is None:
        raise not_found(name, "name")
    return public(entry)


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=ADAPTER_ERRORS)
async def delete_adapter(name: str, adapters: Adapters) -> dict[str, Any]:
    """Forget the adapter (requests already using it finish with it)."""
    if not adapters.delete(name):
        raise not_found(name, "name")
    return {"id": name, "object": "adapter.deleted", "deleted": True}


def not_found(name: str, param: str) -> APIError:
    return APIError(404, f"no adapter {name!r} on this worker (POST /v1/adapters first)", param=param,
                    code="adapter_not_found")


# -- `lora` on image requests ---------------------------------------------------------------

def lora_spec(items: list[LoraItem] | None, wait: str | None, state: WorkerState) -> LoraSpec | None:
    """The engine's `LoraSpec` for a request's `lora`: 400 over the per-request limit, 404 for a name
    this worker does not have (named in the message), 400 on a worker without adapters."""
    if not items:
        return None
    limit = state.settings.max_adapters_per_request
    if state.adapters is None or limit == 0:
        raise InvalidParam("lora", "this worker serves no LoRA adapters", code="unsupported_value")
    if len(items) > limit:
        raise InvalidParam("lora", f"at most {limit} adapters per request on this worker (got {len(items)})",
                           code="too_many_adapters")
    for item in items:
        if state.adapters.get(item.name) is None:
            raise not_found(item.name, "lora")
    return LoraSpec(tuple(LoraRef(i.name, i.scale) for i in items), wait=wait or "bounded")


def lora_info(spec: LoraSpec | None) -> dict[str, Any]:
    """The response's `stepfleet.lora` (empty for requests without adapters)."""
    if spec is None:
        return {}
    return {"lora": {"adapters": [{"name": r.name, "scale": r.scale} for r in spec.adapters], "wait": spec.wait,
                     "steps_without_adapter": spec.report.steps_without,
                     "waited_s": round(spec.report.waited_s, 6)}}


class AdapterHold:
    """Pins a request's adapters from arrival to answer; with `wait: full`, waits for their loads."""

    def __init__(self, spec: LoraSpec | None, registry: AdapterRegistry | None) -> None:
        self.spec, self.registry = spec, registry
        self.leases: list[AdapterLease] = []

    async def __aenter__(self) -> AdapterHold:
        if self.spec is None or self.registry is None:
            return self
        try:
            for ref in self.spec.adapters:
                self.leases.append(self.registry.acquire(ref.name))
        except KeyError as exc:
            self.release()
            raise not_found(str(exc.args[0]), "lora") from None
        if self.spec.wait == "full":
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                await asyncio.gather(*(asyncio.wrap_future(lease.future) for lease in self.leases))
            except Exception as exc:
                self.release()
                raise APIError(503, f"adapter failed to load: {type(exc).__name__}: {exc}", param="lora",
                               code="adapter_load_failed") from None
            except BaseException:  # the client went away while waiting: unpin, or the adapter stays pinned
                self.release()
                raise
            self.spec.report.waited_s += loop.time() - t0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        for lease in self.leases:
            with contextlib.suppress(Exception):
                lease.release()
        self.leases = []
