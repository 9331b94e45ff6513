"""Adapters through the router: affinity for requests that name them, and `/v1/adapters` fanned out.

- **Affinity.** A request with `lora` is balanced as a request *for* its adapters: the key is
  its adapter names, sorted (`lora_affinity`), and the worker ranked first for the key by the
  rendezvous hashing templates use (`balancing.rendezvous_rank`) is its home — where the
  adapter is already on the device after the first such request. A worker other than the
  home may take it when the home is busy: its cost there is the request's plus an adapter
  load (`LORA_MISS_FACTOR`), so the least-loaded worker wins once the home is further behind
  than a load costs (the fall back to least-loaded the issue asks for).
- **Registry calls fan out.** Every worker may serve any adapter (affinity is a preference),
  so `POST /v1/adapters` goes to every available worker with the same body, and answers the
  first failure if any worker refused it (the file is the same, so they refuse alike), else
  the first success; `GET` merges the lists (each name once), `GET /{name}` and `DELETE`
  answer the first worker that has it. A large file is better registered by `source`: the
  router holds an upload in memory (up to its `--max-body-bytes`) while it fans out.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stepfleet.serving.errors import APIError
from stepfleet.serving.http.openapi import ADAPTER_ERRORS
from stepfleet.serving.jsonbody import read_bounded
from stepfleet.serving.router.costing import RequestCost
from stepfleet.serving.router.templates import first_found, merge_lists
from stepfleet.serving.router.upstream import Reply, UpstreamError
from stepfleet.serving.schemas import AdapterForm

if TYPE_CHECKING:
    from stepfleet.serving.router.app import Router
    from stepfleet.serving.router.balancing import EndpointLoad

#: A request's cost on a worker that must load its adapters first, relative to its home's.
LORA_MISS_FACTOR = 1.25
#: Seconds a worker has to answer a registry call (a registration parses the file).
ADAPTER_TIMEOUT_S = 120.0


def lora_affinity(lora: Any) -> str | None:
    """The affinity key of a request's `lora` field (a JSON list, or a form's JSON text)."""
    if isinstance(lora, str):
        import json

        try:
            lora = json.loads(lora)
        except ValueError:
            return None
        lora = lora if isinstance(lora, list) else [lora]
    if not isinstance(lora, list):
        return None
    names = sorted({item["name"] for item in lora if isinstance(item, dict) and isinstance(item.get("name"), str)})
    return "lora:" + ",".join(names) if names else None


def with_lora_affinity(cost: RequestCost, lora: Any) -> RequestCost:
    """`cost` balanced toward its adapters' home (unless it already follows a template)."""
    key = lora_affinity(lora)
    if key is None or cost.template_id or cost.affinity:
        return cost
    return dataclasses.replace(cost, affinity=key, uncached_units=cost.units * LORA_MISS_FACTOR)


async def _ask_all(router: Router, request: Request, body: bytes) -> list[tuple[EndpointLoad, Reply]]:
    tenant = router.authorize(request)
    eps = router.available_workers()
    if not eps:
        raise APIError(503, "no worker is available", code="no_pool", headers={"Retry-After": "5"})
    assert router.client is not None
    headers = [("x-request-id", request.state.request_id)] + router.headers_for(tenant)
    if body:
        headers.append(("content-type", request.headers.get("content-type", "application/octet-stream")))
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")

    async def one(ep: EndpointLoad) -> tuple[EndpointLoad, Reply] | None:
        try:
            reply = await router.client.request(request.method, ep.url + target, headers, body,
                                                timeout_s=ADAPTER_TIMEOUT_S)
            return ep, reply
        except UpstreamError:
            return None

    replies = [r for r in await asyncio.gather(*(one(ep) for ep in eps)) if r is not None]
    if not replies:
        raise APIError(503, "no worker answered", code="upstream_unavailable", headers={"Retry-After": "1"})
    return replies


def _relay(reply: Reply) -> Response:
    kept = [(k, v) for k, v in reply.headers if k.lower() in ("content-type", "retry-after")]
    response = Response(reply.content, status_code=reply.status)
    response.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in kept]
    return response


def registration_answer(replies: Sequence[tuple[EndpointLoad, Reply]]) -> Reply:
    """A refusal if any worker refused (they hold the same file), else the first success."""
    for _, reply in replies:
        if not 200 <= reply.status < 300:
            return reply
    return replies[0][1]


def add_adapter_routes(app: FastAPI, router: Router, max_body_bytes: int) -> None:
    """`/v1/adapters` on the router: every call asks every available worker."""

    form_schema = AdapterForm.model_json_schema()

    @app.post("/v1/adapters", tags=["adapters"], responses=ADAPTER_ERRORS, openapi_extra={"requestBody": {
        "required": True, "content": {"multipart/form-data": {"schema": form_schema}}}})
    async def create_adapter(request: Request) -> Response:
        """Registered on every worker (affinity prefers a home, but any worker may serve it)."""
        body = await read_bounded(request, max_body_bytes)
        return _relay(registration_answer(await _ask_all(router, request, body)))

    @app.get("/v1/adapters", tags=["adapters"], responses=ADAPTER_ERRORS)
    async def list_adapters(request: Request) -> Response:
        merged = merge_lists(await _ask_all(router, request, b""))
        return JSONResponse(merged or {"object": "list", "data": []})

    @app.get("/v1/adapters/{name}", tags=["adapters"], responses=ADAPTER_ERRORS)
    async def get_adapter(request: Request, name: str) -> Response:
        found = first_found(await _ask_all(router, request, b""))
        assert found is not None
        return _relay(found[1])

    @app.delete("/v1/adapters/{name}", tags=["adapters"], responses=ADAPTER_ERRORS)
    async def delete_adapter(request: Request, name: str) -> Response:
        found = first_found(await _ask_all(router, request, b""))
        assert found is not None
        return _relay(found[1])
