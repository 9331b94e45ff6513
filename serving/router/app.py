"""The router's HTTP app: the worker's public API, forwarded to the right worker.

`create_app(config, settings)` wires the fleet view, the pure balancer, the forwarder, the
background loops (config reload, worker load polling, discovery) and the routes. Tests pass
a config object and a static fleet; the CLI passes the file path so edits are picked up.

What the router checks itself, before any worker sees a request: API key and per-key rate
(401/429), body size (413), JSON syntax and the generation schema (400 naming the field),
the edit form's required fields. Everything else is the worker's to judge, and its answer
(a 4xx with its own message) is passed through unchanged.

Its `/openapi.json` documents the request bodies with the workers' own models
(`serving.schemas`), declared through `openapi_extra` rather than as parameters: FastAPI
would otherwise read and parse every body before the handler, ahead of the API-key check and
the body-size limit, and the router forwards the client's bytes unchanged anyway (an edit's
multipart body is parsed once, for its cost, and never re-encoded).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from stepfleet.serving.errors import (
    APIError,
    error_response,
    install_error_handlers,
    validation_error,
)
from stepfleet.serving.middleware import RequestIdMiddleware
from stepfleet.serving.router import costing
from stepfleet.serving.router.auth import (
    KeysFileError,
    KeySpec,
    RateLimiter,
    bearer_token,
    digest,
    parse_keys,
)
from stepfleet.serving.router.balancing import Balancer
from stepfleet.serving.router.config import ConfigError, RouterConfig, RouterSettings, parse_config
from stepfleet.serving.router.discovery import Discovery, StaticDiscovery
from stepfleet.serving.router.forwarding import Forwarder, UpstreamReply, make_client
from stepfleet.serving.router.metrics import RouterMetrics
from stepfleet.serving.router.state import FleetState
from stepfleet.serving.router.upstream import ConnectFailed, UpstreamClient, UpstreamError
from stepfleet.serving.schemas import ImageEditForm, ImageGenerationRequest, TemplateForm

log = logging.getLogger(__name__)
access_log = logging.getLogger("stepfleet.router.access")

#: A template request's cost away from the template's home: large, so the home wins unless unusable.
TEMPLATE_MISS_UNITS = 1000.0


def documented_body(model: type[BaseModel], media_type: str) -> dict[str, Any]:
    """`openapi_extra` that documents `model` as the body of a route that forwards raw bytes."""
    schema = model.model_json_schema()  # self-contained: nested definitions stay in its `$defs`
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


class Router:
    """What the handlers and background loops share."""

    def __init__(self, config: RouterConfig, settings: RouterSettings, config_path: str | None,
                 discovery: Discovery, client: UpstreamClient | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.config_path = config_path
        self.discovery = discovery
        self.clock = clock
        self.metrics = RouterMetrics()
        self.fleet = FleetState()
        self.balancer = Balancer(settings.policy, settings.max_inflight_per_worker)
        self.client = client
        self.forwarder: Forwarder | None = None
        self.keys: dict[str, KeySpec] | None = None
        self.limiter = RateLimiter()
        self._config_text: str | None = None
        self._keys_text: str | None = None
        self.apply_config(config)
        if settings.api_keys_file:
            self.reload_keys(strict=True)

    # -- config and keys ---------------------------------------------------------------------
    def apply_config(self, config: RouterConfig) -> None:
        self.fleet.apply_config(config)
        self.balancer.retain(p.name for p in config.pools)
        self.metrics.weight.clear()
        for p in config.pools:
            self.metrics.weight.labels(p.name).set(p.weight)
        self.update_endpoint_gauges()

    def reload_config(self) -> bool:
        """Re-read the config file if it changed; a bad file keeps the current config."""
        if not self.config_path:
            return False
        try:
            text = Path(self.config_path).read_text()
        except OSError as exc:
            log.warning("cannot read router config %s: %s", self.config_path, exc)
            self.metrics.config_reloads.labels("error").inc()
            return False
        if text == self._config_text:
            return False
        self._config_text = text
        try:
            config = parse_config(text)
        except ConfigError as exc:
            log.error("keeping the current router config: %s", exc)
            self.metrics.config_reloads.labels("error").inc()
            return False
        self.apply_config(config)
        self.discovery.update(config)
        self.metrics.config_reloads.labels("ok").inc()
        log.info("router config applied: weights %s", config.weights())
        return True

    def reload_keys(self, strict: bool = False) -> None:
        path = self.settings.api_keys_file
        assert path
        try:
            text = Path(path).read_text()
            if text == self._keys_text:
                return
            keys = parse_keys(text, self.settings.rate_limit_rps, self.settings.rate_limit_burst)
        except (OSError, KeysFileError) as exc:
            if strict:
                raise
            log.error("keeping the current API keys: %s", exc)
            return
        self._keys_text = text
        self.keys = keys
        log.info("API keys loaded: %d key(s)", len(keys))

    def update_endpoint_gauges(self) -> None:
        now = self.clock()
        mi = self.settings.max_inflight_per_worker
        self.metrics.endpoints.clear()
        for p in self.fleet.pools:
            usable = sum(1 for e in p.endpoints if e.usable(now, mi))
            self.metrics.endpoints.labels(p.name, "usable").set(usable)
            self.metrics.endpoints.labels(p.name, "unusable").set(len(p.endpoints) - usable)

    # -- per request ---------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.keys is None:
            return
        token = bearer_token(request.headers.get("authorization"))
        spec = self.keys.get(digest(token)) if token else None
        if spec is None:
            raise APIError(401, "missing or invalid API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        wait = self.limiter.check(digest(token), spec, self.clock())  # type: ignore[arg-type]
        if wait > 0:
            raise APIError(429, f"rate limit of {spec.rps:g} requests/s exceeded for this key",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
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
        request._body = body  # so request.form() can parse what we already read
        return body


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (or the response is complete): ASGI `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_client_leaves(request: Request, work: Awaitable[UpstreamReply]) -> UpstreamReply:
    """Run `work`; if the client disconnects first, cancel it (closing the upstream connection,
    which the worker sees and frees the request's batch slot)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise APIError(499, "client closed request", code="client_closed")


def create_app(config: RouterConfig, settings: RouterSettings | None = None, *, config_path: str | None = None,
               discovery: Discovery | None = None, client: UpstreamClient | None = None) -> FastAPI:
    settings = settings or RouterSettings()
    router = Router(config, settings, config_path, discovery or StaticDiscovery(), client)
    if config_path:
        router._config_text = Path(config_path).read_text()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        own_client = router.client is None
        router.client = router.client or make_client(settings)
        router.forwarder = Forwarder(settings, router.fleet, router.balancer, router.metrics, router.client,
                                     router.clock)

        def on_change(pool: str, urls: list[str] | None) -> None:  # called from discovery threads
            loop.call_soon_threadsafe(router.fleet.set_endpoints, pool, urls)

        assert router.fleet.config is not None
        router.discovery.start(router.fleet.config, on_change)
        tasks = [asyncio.create_task(_poll_loads(router)), asyncio.create_task(_reload_loop(router))]
        # Everything allocated so far (FastAPI, pydantic, prometheus: ~10^5 objects) lives for
        # the whole process; freezing it keeps the cyclic GC from walking it on every full
        # collection, which otherwise shows up as 20-40 ms pauses in the router's p99.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            router.discovery.stop()
            if own_client:
                await router.client.aclose()

    app = FastAPI(title="stepfleet router", version="0.1.0", lifespan=lifespan)
    app.state.router = router
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    async def proxied(request: Request, route: str, cost_of: Callable[[bytes], Awaitable[costing.RequestCost]],
                      path: str | None = None) -> Response:
        """Auth, body, cost, forward with failover, answer; one metrics line and one log line per request."""
        started = time.perf_counter()
        rid = request.state.request_id
        pool = "none"
        status = 500
        try:
            router.authorize(request)
            body = await router.read_body(request)
            cost = await cost_of(body)
            assert router.forwarder is not None
            reply = await _unless_client_leaves(request, router.forwarder.forward(
                request.method, path or request.url.path, request.url.query, request.headers.items(), body, cost,
                rid, route))
            pool, status = reply.pool, reply.status
            response = Response(reply.content, status_code=reply.status)
            response.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
            response.raw_headers += [(b"x-stepfleet-pool", pool.encode()),
                                     (b"x-stepfleet-attempts", str(reply.attempts).encode())]
            return response
        except APIError as exc:
            status = exc.status
            raise
        finally:
            router.metrics.requests.labels(pool, route, str(status)).inc()
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %s -> %s %d %.1fms", rid, request.method, request.url.path, pool, status,
                                (time.perf_counter() - started) * 1000)

    def fixed(cost: costing.RequestCost) -> Callable[[bytes], Awaitable[costing.RequestCost]]:
        async def _cost(_: bytes) -> costing.RequestCost:
            return cost
        return _cost

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        # Ready once a config is loaded: with no workers the router still answers (a JSON 503
        # naming the problem), which is more useful to a client than a connection refused.
        snap = router.fleet.snapshot(router.clock())
        pools = {p["name"]: sum(1 for e in p["endpoints"] if e["ready"] and not e["down"]) for p in snap["pools"]}
        return JSONResponse({"status": "ready", "service": snap["service"], "pools": pools})

    @app.get("/metrics")
    async def metrics() -> Response:
        router.update_endpoint_gauges()
        return PlainTextResponse(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/state")
    async def state() -> dict[str, Any]:
        """The router's view of pools, weights and workers (for people and tests; no secrets)."""
        return router.fleet.snapshot(router.clock())

    @app.post("/v1/images/generations", openapi_extra=documented_body(ImageGenerationRequest, "application/json"))
    async def generations(request: Request) -> Response:
        async def cost_of(body: bytes) -> costing.RequestCost:
            data = _parse_json(body)
            try:
                ImageGenerationRequest.model_validate(data)
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            return costing.generation_cost(data, settings.default_steps, settings.default_size)

        return await proxied(request, "generations", cost_of)

    @app.post("/v1/images/edits", openapi_extra=documented_body(ImageEditForm, "multipart/form-data"))
    async def edits(request: Request) -> Response:
        async def cost_of(_: bytes) -> costing.RequestCost:
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                raise APIError(400, "content-type: image edits are sent as multipart/form-data",
                               param="content-type", code="invalid_content_type")
            try:
                form = await request.form(max_part_size=settings.max_body_bytes)
            except Exception as exc:
                raise APIError(400, f"malformed multipart body: {exc}", code="invalid_multipart") from None
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if not fields.get("prompt"):
                raise APIError(400, "prompt: field required", param="prompt", code="missing_field")
            if form.get("image") is None and not fields.get("template_id"):
                raise APIError(400, "image: field required (or send template_id)", param="image",
                               code="missing_field")
            mask = form.get("mask")
            ratio = None
            if mask is not None and not isinstance(mask, str):
                ratio = await asyncio.to_thread(costing.mask_ratio_from_png, await mask.read())
            await form.close()
            return costing.edit_cost(fields, ratio, settings.default_steps, settings.default_size)

        return await proxied(request, "edits", cost_of)

    async def template_cost(request: Request, body: bytes, template_id: str | None) -> costing.RequestCost:
        if template_id is None and body:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                with contextlib.suppress(Exception):
                    form = await request.form(max_part_size=settings.max_body_bytes)
                    value = form.get("template_id")
                    template_id = value if isinstance(value, str) and value else None
                    await form.close()
            elif "json" in ctype:
                with contextlib.suppress(Exception):
                    data = json.loads(body)
                    value = data.get("template_id") or data.get("id")
                    template_id = value if isinstance(value, str) and value else None
        if template_id is None:
            return costing.trivial_cost()
        return costing.RequestCost("other", costing.TRIVIAL_UNITS, TEMPLATE_MISS_UNITS, template_id)

    async def templates(request: Request) -> Response:
        async def cost_of(body: bytes) -> costing.RequestCost:
            return await template_cost(request, body, None)

        return await proxied(request, "templates", cost_of)

    app.get("/v1/templates")(templates)
    app.post("/v1/templates", openapi_extra=documented_body(TemplateForm, "multipart/form-data"))(templates)

    async def template(request: Request, template_id: str) -> Response:
        if request.method == "DELETE":
            return await _delete_everywhere(router, request)

        async def cost_of(body: bytes) -> costing.RequestCost:
            return await template_cost(request, body, template_id)

        return await proxied(request, "templates", cost_of)

    app.get("/v1/templates/{template_id}")(template)
    app.delete("/v1/templates/{template_id}")(template)
    # Not the workers' API, but a template's home should answer them (405) all the same.
    app.api_route("/v1/templates/{template_id}", methods=["PUT", "PATCH", "POST"], include_in_schema=False)(template)

    # Anything else under /v1 goes to a worker as it is; the workers document it.
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def other(request: Request, rest: str) -> Response:
        return await proxied(request, "other", fixed(costing.trivial_cost()))

    return app


def _parse_json(body: bytes) -> Any:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


async def _delete_everywhere(router: Router, request: Request) -> Response:
    """A template's activations may sit on several workers (its home moved, failover): drop them all."""
    router.authorize(request)
    rid = request.state.request_id
    now = router.clock()
    eps = [e for e in router.fleet.endpoints() if e.usable(now, router.settings.max_inflight_per_worker)]
    if not eps:
        router.metrics.requests.labels("none", "templates", "503").inc()
        return error_response(APIError(503, "no worker is available", code="no_pool", headers={"Retry-After": "5"}))
    assert router.client is not None
    headers = [("x-request-id", rid)]

    async def one(url: str):
        try:
            return await router.client.request("DELETE", url + request.url.path, headers)  # type: ignore[union-attr]
        except UpstreamError:
            return None

    replies = [r for r in await asyncio.gather(*(one(e.url) for e in eps)) if r is not None]
    ok = [r for r in replies if 200 <= r.status < 300]
    chosen = ok[0] if ok else (replies[0] if replies else None)
    if chosen is None:
        router.metrics.requests.labels("none", "templates", "503").inc()
        return error_response(APIError(503, "no worker answered", code="upstream_unavailable"))
    router.metrics.requests.labels("all", "templates", str(chosen.status)).inc()
    ctype = next((v for k, v in chosen.headers if k == "content-type"), "application/json")
    return Response(chosen.content, status_code=chosen.status, media_type=ctype)


async def _poll_loads(router: Router) -> None:
    """Every `load_poll_s`: each worker's /v1/load (readiness, backlog); revives ejected workers."""
    timeout_s = min(2.0, router.settings.load_poll_s * 2)

    async def one(ep) -> None:
        assert router.client is not None
        try:
            resp = await router.client.request("GET", ep.url + "/v1/load", [], timeout_s=timeout_s)
        except ConnectFailed:
            ep.down_until = router.clock() + router.settings.eject_s
            return
        except UpstreamError:
            return
        if resp.status != 200:
            return  # an older worker without /v1/load: rely on response headers and failures
        try:
            data = json.loads(resp.content)
            ep.ready = bool(data.get("ready", True))
            ep.report(float(data.get("backlog_s", 0.0)), router.clock())
            ep.down_until = 0.0
        except (ValueError, AttributeError, TypeError):
            pass

    while True:
        try:
            await asyncio.gather(*(one(ep) for ep in router.fleet.endpoints()))
            router.update_endpoint_gauges()
        except Exception:  # the poller must survive anything
            log.exception("load poll failed")
        await asyncio.sleep(router.settings.load_poll_s)


async def _reload_loop(router: Router) -> None:
    while True:
        await asyncio.sleep(router.settings.reload_s)
        try:
            router.reload_config()
            if router.settings.api_keys_file:
                router.reload_keys()
        except Exception:
            log.exception("reload failed")
