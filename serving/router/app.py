"""The router's HTTP app: the worker's public API, forwarded to the right worker.

`create_app(config, settings)` wires the fleet view, the pure balancer, the forwarder, the
background loops (config reload, worker load polling, discovery) and the routes. Tests pass
a config object and a static fleet; the CLI passes the file path so edits are picked up.

What the router checks itself, before any worker sees a request: API key and per-key rate
(401/429), body size (413), JSON syntax and depth (`serving.jsonbody`), and the generation,
edit and template schemas (400 naming the field). A client's mistake is never sent to a
worker, so it is never retried there nor blamed on one (issue 19). Everything else is the
worker's to judge, and its answer (a 4xx with its own message) is passed through unchanged.

What the router adds to what it forwards: its worker token, the tenant of the request's API
key, and, for a new template, the id it chose (`serving.worker_auth`); a request's
`deadline_ms` bounds its attempts (504 past it, `forwarding`); template lookups and listings
ask every worker (`templates`).

Streamed requests (`stream: true` on generations and edits) are relayed as they arrive, never
buffered (`StreamedResponse`, shared with the worker): when the client leaves, the worker's
connection is closed and the worker cancels the request at its next step.

Its `/openapi.json` documents the request bodies with the workers' own models
(`serving.schemas`), declared through `openapi_extra` rather than as parameters: FastAPI
would otherwise read and parse every body before the handler, ahead of the API-key check and
the body-size limit, and the router forwards the client's bytes unchanged anyway (an edit's
multipart body is parsed once, for its cost, and never re-encoded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from stepfleet.serving.errors import (
    APIError,
    install_error_handlers,
    validation_error,
)
from stepfleet.serving.http.openapi import (
    DEADLINE_ERRORS,
    EDIT_ERRORS,
    ERRORS,
    LOOKUP_ERRORS,
    STREAM_RESPONSE,
)
from stepfleet.serving.http.streams import StreamedResponse
from stepfleet.serving.jsonbody import parse_object, read_bounded
from stepfleet.serving.middleware import RequestIdMiddleware
from stepfleet.serving.router import costing
from stepfleet.serving.router.adapters import add_adapter_routes, with_lora_affinity
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
from stepfleet.serving.router.fleet_view import fleet_view
from stepfleet.serving.router.forwarding import Forwarder, UpstreamReply, make_client
from stepfleet.serving.router.health import Health
from stepfleet.serving.router.json_edits import is_json, json_edit_cost
from stepfleet.serving.router.metrics import RouterMetrics
from stepfleet.serving.router.playground import install_playground
from stepfleet.serving.router.state import FleetState
from stepfleet.serving.router.templates import (
    TemplateHomes,
    ask_all,
    first_found,
    merge_lists,
    new_template_id,
    registered_id,
)
from stepfleet.serving.router.upstream import UpstreamClient, request_target
from stepfleet.serving.router.videos import VideoHomes, install_videos
from stepfleet.serving.schemas import (
    ImageEditForm,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationForm,
    TemplateDeleted,
    TemplateForm,
    TemplateList,
    TemplateObject,
)
from stepfleet.serving.worker_auth import TEMPLATE_ID_HEADER, TENANT_HEADER, TokenFile, bearer

log = logging.getLogger(__name__)
access_log = logging.getLogger("stepfleet.router.access")

#: A template request's cost away from the template's home: large, so the home wins unless unusable.
#: An edit of a template pays it too: only the worker that registered a template holds it (its
#: image and activations); anywhere else the edit is a 404.
TEMPLATE_MISS_UNITS = 1000.0
#: Template lookups, listings and deletions are bookkeeping a worker answers between steps, in
#: milliseconds; one that just hung must not hold the answer for the upstream timeout.
LOOKUP_TIMEOUT_S = 10.0
#: Form bodies, as the workers read them (`serving.http.uploads`).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: Form values pydantic reads as true (how a worker reads `stream` from a form).
FORM_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})


def documented_body(model: type[BaseModel], media_type: str) -> dict[str, Any]:
    """`openapi_extra` that documents `model` as the body of a route that forwards raw bytes."""
    schema = model.model_json_schema()  # self-contained: nested definitions stay in its `$defs`
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


@dataclass(frozen=True)
class Plan:
    """What the router learned of a request before forwarding it."""

    cost: costing.RequestCost
    #: The client's `deadline_ms`: attempts and retries end when it passes (504).
    deadline_ms: float | None = None
    #: Headers only the router sends (a new template's id).
    headers: tuple[tuple[str, str], ...] = ()
    #: `stream: true`: the answer is relayed as it arrives.
    stream: bool = False


def upstream_target(request: Request) -> str:
    """The path and query as the client sent them (raw bytes, percent-encoded where needed),
    not Starlette's decoded path: a decoded `%2F` would become a separator, and characters
    outside Latin-1 could not be written into a request line (issue 19)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return request_target(raw.decode("utf-8", "surrogateescape"), query.decode("utf-8", "surrogateescape"))


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
        self.health: Health | None = None
        self.keys: dict[str, KeySpec] | None = None
        self.limiter = RateLimiter()
        self.homes = TemplateHomes()
        self.worker_tokens = TokenFile(settings.worker_token_file)
        #: Sent to every worker with every request: the router's credential. Updated in place
        #: when the token file is rotated (`reload_worker_token`), so holders of it see the change.
        self.worker_headers: list[tuple[str, str]] = []
        self.reload_worker_token()
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

    def reload_worker_token(self) -> None:
        """Send the token file's first token from now on (the file is re-read when it changed)."""
        self.worker_tokens.refresh()
        token = self.worker_tokens.send
        self.worker_headers[:] = [bearer(token)] if token else []

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
        self.metrics.inflight.clear()
        for p in self.fleet.pools:
            usable = sum(1 for e in p.endpoints if e.usable(now, mi))
            self.metrics.endpoints.labels(p.name, "usable").set(usable)
            self.metrics.endpoints.labels(p.name, "unusable").set(len(p.endpoints) - usable)
            self.metrics.inflight.labels(p.name).set(sum(e.inflight for e in p.endpoints))

    # -- per request ---------------------------------------------------------------------------
    def authorize(self, request: Request) -> str | None:
        """The tenant of the request's API key (None when the router takes no keys); 401/429 otherwise."""
        if self.keys is None:
            return None
        token = bearer_token(request.headers.get("authorization"))
        spec = self.keys.get(digest(token)) if token else None
        if spec is None:
            raise APIError(401, "missing or invalid API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        wait = self.limiter.check(digest(token), spec, self.clock())  # type: ignore[arg-type]
        if wait > 0:
            raise APIError(429, f"rate limit of {spec.rps:g} requests/s exceeded for this key",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        return spec.tenant

    def headers_for(self, tenant: str | None) -> list[tuple[str, str]]:
        """What the router adds to a request for `tenant`: its token, and the tenant."""
        return self.worker_headers + ([(TENANT_HEADER, tenant)] if tenant else [])

    def available_workers(self) -> list[Any]:
        now = self.clock()
        return [e for e in self.fleet.endpoints() if e.available(now)]


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
    video_homes = VideoHomes()
    if config_path:
        router._config_text = Path(config_path).read_text()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        own_client = router.client is None
        router.client = router.client or make_client(settings)
        router.health = Health(settings, router.fleet, router.client, router.metrics, router.worker_headers,
                               router.clock)
        router.forwarder = Forwarder(settings, router.fleet, router.balancer, router.metrics, router.client,
                                     router.clock, router.health)

        def on_change(pool: str, urls: list[str] | None) -> None:  # called from discovery threads
            loop.call_soon_threadsafe(router.fleet.set_endpoints, pool, urls)

        assert router.fleet.config is not None
        router.discovery.start(router.fleet.config, on_change)
        tasks = [asyncio.create_task(router.health.run()), asyncio.create_task(_reload_loop(router))]
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

    async def proxied(request: Request, route: str, plan_of: Callable[[bytes], Awaitable[Plan]],
                      body_limit: int | None = None) -> Response:
        """Auth, body, plan, forward with failover, answer; one metrics line and one log line per request."""
        started = time.perf_counter()
        arrived = router.clock()
        rid = request.state.request_id
        pool = "none"
        status = 500
        try:
            tenant = router.authorize(request)
            body = await read_bounded(request, body_limit or settings.max_body_bytes)
            plan = await plan_of(body)
            deadline = None if plan.deadline_ms is None else arrived + plan.deadline_ms / 1000.0
            assert router.forwarder is not None
            reply = await _unless_client_leaves(request, router.forwarder.forward(
                request.method, upstream_target(request), "", request.headers.items(), body, plan.cost,
                rid, route, deadline, router.headers_for(tenant) + list(plan.headers), stream=plan.stream))
            pool, status = reply.pool, reply.status
            extra = [("x-stepfleet-pool", pool), ("x-stepfleet-attempts", str(reply.attempts))]
            if reply.stream is not None:
                release = reply.release

                async def on_close() -> None:
                    if release is not None:
                        release()

                return StreamedResponse(reply.stream, status_code=reply.status, headers=reply.headers + extra,
                                        on_close=on_close)
            if route == "videos" and request.method == "POST" and 200 <= status < 300:
                video_homes.record_reply(reply)  # follow-ups are pinned to this worker (`router.videos`)
            if route == "templates" and request.method == "POST" and 200 <= status < 300:
                template_id = registered_id(reply)
                if template_id:
                    router.homes.record(template_id, reply.url)
            response = Response(reply.content, status_code=reply.status)
            response.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
            response.raw_headers += [(k.encode(), v.encode()) for k, v in extra]
            return response
        except APIError as exc:
            status = exc.status
            raise
        finally:
            router.metrics.requests.labels(pool, route, str(status)).inc()
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s %s -> %s %d %.1fms", rid, request.method, request.url.path, pool, status,
                                (time.perf_counter() - started) * 1000)

    def fixed(cost: costing.RequestCost) -> Callable[[bytes], Awaitable[Plan]]:
        async def _plan(_: bytes) -> Plan:
            return Plan(cost)
        return _plan

    add_adapter_routes(app, router, settings.max_body_bytes)

    async def fanned_out(request: Request, answer: Callable[[list], Response]) -> Response:
        """Auth, then the same request to every available worker; `answer` makes the reply."""
        rid = request.state.request_id
        status = 500
        try:
            tenant = router.authorize(request)
            eps = router.available_workers()
            if not eps:
                raise APIError(503, "no worker is available", code="no_pool", headers={"Retry-After": "5"})
            assert router.client is not None
            headers = [("x-request-id", rid)] + router.headers_for(tenant)
            replies = await ask_all(router.client, eps, request.method, upstream_target(request), headers,
                                    min(settings.upstream_timeout_s, LOOKUP_TIMEOUT_S))
            if not replies:
                raise APIError(503, "no worker answered", code="upstream_unavailable", headers={"Retry-After": "1"})
            response = answer(replies)
            status = response.status_code
            return response
        except APIError as exc:
            status = exc.status
            raise
        finally:
            router.metrics.requests.labels("all", "templates", str(status)).inc()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        # Ready once a config is loaded: with no workers the router still answers (a JSON 503
        # naming the problem), which is more useful to a client than a connection refused.
        snap = router.fleet.snapshot(router.clock())
        pools = {p["name"]: sum(1 for e in p["endpoints"] if e["ready"] and not e["down"] and not e["unresponsive"])
                 for p in snap["pools"]}
        return JSONResponse({"status": "ready", "service": snap["service"], "pools": pools})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        router.update_endpoint_gauges()
        return PlainTextResponse(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/state")
    async def state() -> dict[str, Any]:
        """The router's view of pools, weights and workers (for people and tests; no secrets)."""
        return router.fleet.snapshot(router.clock())

    @app.post("/v1/images/generations",
              responses=ERRORS | DEADLINE_ERRORS | {200: {"model": ImagesResponse, **STREAM_RESPONSE[200]}},
              openapi_extra=documented_body(ImageGenerationRequest, "application/json"))
    async def generations(request: Request) -> Response:
        async def plan_of(body: bytes) -> Plan:
            data = parse_object(body)
            try:
                valid = ImageGenerationRequest.model_validate(data)
            except ValidationError as exc:
                raise validation_error(exc.errors()) from None
            cost = with_lora_affinity(costing.generation_cost(data, settings.default_steps, settings.default_size),
                                      data.get("lora"))
            return Plan(cost, valid.deadline_ms, stream=bool(valid.stream))

        return await proxied(request, "generations", plan_of,
                             body_limit=min(settings.max_json_bytes, settings.max_body_bytes))

    async def checked_form(request: Request, model: type[BaseModel], what: str) -> dict[str, Any]:
        """The multipart form's fields, checked against `model` (a 400 naming the field)."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(FORM_TYPES):  # what the workers read (`http.uploads`)
            raise APIError(400, f"content-type: {what} are sent as multipart/form-data",
                           param="content-type", code="invalid_content_type")
        try:
            form = await request.form(max_part_size=settings.max_body_bytes)
        except Exception as exc:
            raise APIError(400, f"malformed multipart body: {exc}", code="invalid_multipart") from None
        fields: dict[str, Any] = {k: form.getlist(k) if k.endswith("[]") else form.get(k) for k in form.keys()}
        try:
            model.model_validate(fields)
        except ValidationError as exc:
            await form.close()
            raise validation_error(exc.errors()) from None
        return fields

    @app.post("/v1/images/edits", responses=ERRORS | EDIT_ERRORS | DEADLINE_ERRORS
              | {200: {"model": ImagesResponse, **STREAM_RESPONSE[200]}},
              openapi_extra=documented_body(ImageEditForm, "multipart/form-data"))
    async def edits(request: Request) -> Response:
        async def plan_of(body: bytes) -> Plan:
            if is_json(request.headers.get("content-type", "")):  # OpenAI's JSON edit (images by URL)
                cost, deadline_ms, stream = json_edit_cost(body, settings.default_steps, settings.default_size)
                if cost.template_id:
                    cost = dataclasses.replace(cost, home=router.homes.get(cost.template_id),
                                               uncached_units=max(cost.uncached_units, TEMPLATE_MISS_UNITS))
                return Plan(cost, deadline_ms, stream=stream)
            fields = await checked_form(request, ImageEditForm, "image edits")
            if fields.get("image") is None and not fields.get("image[]") and not fields.get("template_id"):
                raise APIError(400, "image: field required (or send template_id)", param="image",
                               code="missing_field")
            mask = fields.get("mask")
            ratio = None
            if mask is not None and not isinstance(mask, str):
                ratio = await asyncio.to_thread(costing.mask_ratio_from_png, await mask.read())
            texts = {k: v for k, v in fields.items() if isinstance(v, str)}
            for value in fields.values():
                if hasattr(value, "close"):
                    await value.close()
            cost = with_lora_affinity(costing.edit_cost(texts, ratio, settings.default_steps,
                                                        settings.default_size), texts.get("lora"))
            deadline = texts.get("deadline_ms")
            if cost.template_id:
                cost = dataclasses.replace(cost, home=router.homes.get(cost.template_id),
                                           uncached_units=max(cost.uncached_units, TEMPLATE_MISS_UNITS))
            return Plan(cost, float(deadline) if deadline else None,
                        stream=str(texts.get("stream", "")).strip().lower() in FORM_TRUE)

        return await proxied(request, "edits", plan_of)

    @app.post("/v1/images/variations", responses=ERRORS | EDIT_ERRORS | DEADLINE_ERRORS
              | {200: {"model": ImagesResponse}},
              openapi_extra=documented_body(ImageVariationForm, "multipart/form-data"))
    async def variations(request: Request) -> Response:
        async def plan_of(_: bytes) -> Plan:
            fields = await checked_form(request, ImageVariationForm, "image variations")
            texts = {k: v for k, v in fields.items() if isinstance(v, str)}
            for value in fields.values():
                if hasattr(value, "close"):
                    await value.close()
            deadline = texts.get("deadline_ms")
            cost = costing.edit_cost(texts, None, settings.default_steps, settings.default_size)
            return Plan(cost, float(deadline) if deadline else None)

        return await proxied(request, "variations", plan_of)

    @app.post("/v1/templates", responses=ERRORS | LOOKUP_ERRORS | {200: {"model": TemplateObject}},
              openapi_extra=documented_body(TemplateForm, "multipart/form-data"))
    async def register_template(request: Request) -> Response:
        """Registered on the home of an id the router chooses (`templates`)."""

        async def plan_of(_: bytes) -> Plan:
            fields = await checked_form(request, TemplateForm, "templates")
            for value in fields.values():
                if hasattr(value, "close"):
                    await value.close()
            template_id = new_template_id()
            cost = costing.RequestCost("other", costing.TRIVIAL_UNITS, TEMPLATE_MISS_UNITS, template_id)
            return Plan(cost, headers=((TEMPLATE_ID_HEADER, template_id),))

        return await proxied(request, "templates", plan_of)

    @app.get("/v1/templates", responses=LOOKUP_ERRORS | {200: {"model": TemplateList}})
    async def list_templates(request: Request) -> Response:
        """Every worker's templates of the caller's tenant, merged."""

        def answer(replies: list) -> Response:
            merged = merge_lists(replies)
            if merged is not None:
                return JSONResponse(merged)
            _, reply = first_found(replies)  # type: ignore[misc]
            return _relayed(reply)

        return await fanned_out(request, answer)

    @app.get("/v1/templates/{template_id}", responses=LOOKUP_ERRORS | {200: {"model": TemplateObject}})
    async def get_template(request: Request, template_id: str) -> Response:
        """Asked of every worker: the template may sit on a former home."""

        def answer(replies: list) -> Response:
            ep, reply = first_found(replies)  # type: ignore[misc]
            if 200 <= reply.status < 300 and ep is not None:
                router.homes.record(template_id, ep.url)
            return _relayed(reply)

        return await fanned_out(request, answer)

    @app.delete("/v1/templates/{template_id}", responses=LOOKUP_ERRORS | {200: {"model": TemplateDeleted}})
    async def delete_template(request: Request, template_id: str) -> Response:
        """Asked of every worker: a template's activations may sit on several (its home moved)."""

        def answer(replies: list) -> Response:
            _, reply = first_found(replies)  # type: ignore[misc]
            if 200 <= reply.status < 300:
                router.homes.forget(template_id)
            return _relayed(reply)

        return await fanned_out(request, answer)

    # Not the workers' API, but a template's home should answer them (405) all the same.
    async def template_other(request: Request, template_id: str) -> Response:
        home = router.homes.get(template_id)
        return await proxied(request, "templates", fixed(costing.RequestCost(
            "other", costing.TRIVIAL_UNITS, TEMPLATE_MISS_UNITS, template_id, home)))

    app.api_route("/v1/templates/{template_id}", methods=["PUT", "PATCH", "POST"],
                  include_in_schema=False)(template_other)

    @app.get("/v1/fleet", responses=LOOKUP_ERRORS)
    async def fleet(request: Request) -> dict[str, Any]:
        """Pools, ready workers, weights, the mode and the control loop's last decisions with their
        reasons (`fleet_view`); what the playground's fleet panel shows."""
        router.authorize(request)
        return fleet_view(router.fleet.config, router.fleet.snapshot(router.clock()))

    install_videos(app, router, video_homes, proxied, upstream_target)
    install_playground(app)

    @app.get("/v1/controlnets")
    async def controlnets(request: Request) -> Response:
        """The ControlNets requests may name (`controlnet: [...]`): a worker's list (every pool of a
        service registers the same ones, rendered from `spec.controlnets`)."""
        return await proxied(request, "other", fixed(costing.trivial_cost()))

    # Anything else under /v1 goes to a worker as it is; the workers document it.
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def other(request: Request, rest: str) -> Response:
        return await proxied(request, "other", fixed(costing.trivial_cost()))

    return app


def _relayed(reply: Any) -> Response:
    """A worker's answer, as it is (its content type kept)."""
    ctype = next((v for k, v in reply.headers if k == "content-type"), "application/json")
    return Response(reply.content, status_code=reply.status, media_type=ctype)


async def _reload_loop(router: Router) -> None:
    while True:
        await asyncio.sleep(router.settings.reload_s)
        try:
            router.reload_config()
            router.reload_worker_token()
            if router.settings.api_keys_file:
                router.reload_keys()
        except Exception:
            log.exception("reload failed")
