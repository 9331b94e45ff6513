"""A kmock `KubernetesEmulator` with the API-server behaviour kopf and kubectl rely on.

kmock 0.8 stores objects and serves discovery, but (see TOOLING.md) sets no resourceVersion,
uid, generation or creationTimestamp, answers a failed JSON-patch `test` with 500, loses
watch events between list and watch, ignores selectors, has no status subresource, no PUT,
and no CRD-driven resources. This subclass closes exactly those gaps:

- every write stamps a global, monotonic `resourceVersion` and appends to an event log;
  a watch with `?resourceVersion=N` replays the log after N, so nothing is lost;
- `generation` starts at 1 and grows when anything outside metadata/status changes;
- `/status` is a real subresource for kinds that declare it (main-resource writes ignore status);
- JSON-patch `test` failures answer 422, stale `resourceVersion` preconditions 409;
- label and field selectors filter lists and watches; lists carry kind/apiVersion;
- creating a CRD registers its resource for discovery (so `kubectl apply` of crds/ works);
- `faults`: injected errors and delays (409, 500, slow responses), consumed in order;
- `drop_watches()` ends every open watch stream (a dropped connection), and `compact()`
  forgets the event log so far, so a watch resumed from an older resourceVersion gets the API
  server's `410 Gone` (an ERROR event with code 410), after which clients must list again.

It stays an emulator: no controllers, no garbage collection, no schema validation.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import apps, enums, k8s, parsing, references, rendering

K8sError = k8s.KubernetesError

_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock reads `/api/v1/namespaces[/NAME]` as a namespace prefix and crashes; it is a resource."""
    parts = path.strip("/").split("/")
    if parts[:1] == ["api"] and len(parts) in (3, 4) and parts[2] == "namespaces":
        return parsing.ParsedPath(group="", version=parts[1], plural="namespaces", name=parts[3] if len(parts) == 4 else None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path  # kmock's Request parser looks it up at call time

BUILTIN_RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    # "group/version/plural": (kind, namespaced, subresources)
    "v1/namespaces": ("Namespace", False, ("status",)),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/services": ("Service", True, ("status",)),
    "v1/events": ("Event", True, ()),
    "v1/pods": ("Pod", True, ("status",)),
    "apps/v1/deployments": ("Deployment", True, ("status", "scale")),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, ("status",)),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ("status",)),
}
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


@dataclass
class Fault:
    """Answer the next `times` matching requests with `status` (after `delay_s`), or only delay them."""

    method: str | None = None  # GET, POST, PATCH, PUT, DELETE; None: any
    path: str | None = None  # regex searched in the request path; None: any
    status: int | None = 500
    times: int = 1
    delay_s: float = 0.0
    reason: str = "InjectedFault"
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0
            and (self.method is None or self.method == method)
            and (self.path is None or re.search(self.path, path) is not None)
        )


def _disconnected(request: rendering.Request) -> bool:
    transport = request._raw_request.transport if request._raw_request is not None else None
    return transport is None or transport.is_closing()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_directives(patch: Any) -> Any:
    """Drop strategic-merge directives (`$patch`, `$setElementOrder/...`); the rest is a merge patch."""
    if isinstance(patch, dict):
        return {k: _strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    return patch


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


_SELECTOR_TERM = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w./-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def match_labels(selector: str | None, labels: dict[str, str]) -> bool:
    """Equality, inequality, set and existence terms of a label selector."""
    if not selector:
        return True
    for term in re.split(r",(?![^(]*\))", selector):
        m = _SELECTOR_TERM.match(term)
        if not m:
            raise K8sError(status=400, reason="BadRequest", message=f"bad selector term {term!r}")
        neg, key, op, value, setop, values = m.groups()
        if op in ("=", "=="):
            ok = labels.get(key) == value
        elif op == "!=":
            ok = labels.get(key) != value
        elif setop:
            options = {v.strip() for v in values.split(",")}
            ok = (labels.get(key) in options) if setop == "in" else (labels.get(key) not in options)
        else:
            ok = key in labels
        if bool(neg) == ok:
            return False
    return True


def match_fields(selector: str | None, obj: dict[str, Any]) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        negate = key.endswith("!")
        key = key.rstrip("!=")
        node: Any = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (str(node) == value.lstrip("=")) == negate:
            return False
    return True


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """The stateful API server the operator tests run against."""

    faults: list[Fault] = attrs.field(factory=list)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[tuple[int, Any, str, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _log_rvs: list[int] = attrs.field(factory=list, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _compacted_rv: int = attrs.field(default=0, init=False)
    _watch_epoch: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced, subresources) in BUILTIN_RESOURCES.items():
            self.register(key, kind, namespaced, subresources)

    # --- resources ----------------------------------------------------------------------------

    def register(
        self, key: str, kind: str, namespaced: bool, subresources: tuple[str, ...] = (), shortnames: tuple[str, ...] = ()
    ) -> None:
        """Serve a resource ("group/version/plural", or "v1/plural" for the core group)."""
        self.resources[key] = references.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=set(VERBS), subresources=set(subresources),
            singular=kind.lower(), shortnames=set(shortnames),
        )

    def _info(self, resource: Any) -> references.ResourceInfo | None:
        for res in self.resources:
            if res == resource:
                return self.resources[res]
        return None

    def _has_status(self, resource: Any) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec", {})
        for version in spec.get("versions", []):
            if version.get("served", True):
                self.register(
                    f"{spec['group']}/{version['name']}/{spec['names']['plural']}",
                    spec["names"]["kind"],
                    spec.get("scope") == "Namespaced",
                    tuple((version.get("subresources") or {}).keys()),
                    tuple(spec["names"].get("shortNames") or ()),
                )

    # --- request dispatch -----------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> Any:
        method = str(request.method.value).upper()
        path = request.url.path
        for fault in self.faults:
            if fault.matches(method, path):
                fault.times -= 1
                fault.hits += 1
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                if fault.status:
                    raise K8sError(status=fault.status, reason=fault.reason, message=f"injected {fault.status}")
                break
        if method == "PUT" and request.resource is not None and request.name:
            return await rendering.Response(payload=self._replace)(request)
        # Skip KubernetesEmulator._handle (it mutates state without versions); dispatch to fallbacks.
        return await apps.RawHandler._handle(self, request)

    # --- the event log ------------------------------------------------------------------------

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _emit(self, resource: Any, type_: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self._log.append((rv, resource, type_, copy.deepcopy(obj)))
        self._log_rvs.append(rv)
        async with self._changed:
            self._changed.notify_all()

    def _key(self, request: rendering.Request, name: str | None = None, namespace: str | None = None) -> Any:
        info = self._info(request.resource)
        ns = (namespace or request.namespace) if (info is None or info.namespaced) else None
        return (request.resource, ns, name or request.name)

    def _get(self, key: Any) -> dict[str, Any] | None:
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None

    def _store(self, key: Any, obj: dict[str, Any]) -> None:
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj

    # --- handlers (called by kmock's fallback reactions) ----------------------------------------

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = self._get(self._key(request))
        if obj is None:
            raise K8sError(status=404, reason="NotFound", message=f"{request.resource} {request.name} not found")
        return obj

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request.resource)
        if info is None:
            raise K8sError(status=404, reason="NotFound", message=f"the server could not find {request.resource}")
        return {
            "apiVersion": "v1" if request.resource.group == "" else f"{request.resource.group}/{request.resource.version}",
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": self._select(request),
        }

    def _select(self, request: rendering.Request) -> list[dict[str, Any]]:
        labels, fields = request.params.get("labelSelector"), request.params.get("fieldSelector")
        out = []
        for (resource, namespace, _), obj in self._objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            raw = obj.raw
            if match_labels(labels, raw.get("metadata", {}).get("labels") or {}) and match_fields(fields, raw):
                out.append(copy.deepcopy(raw))
        return out

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # send the headers now: the stream is open even if nothing happens
        labels, fields = request.params.get("labelSelector"), request.params.get("fieldSelector")
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        since = request.params.get("resourceVersion")
        epoch = self._watch_epoch
        if since not in (None, "", "0") and int(since) < self._compacted_rv:
            yield {"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired",
                "code": 410, "message": f"too old resource version: {since} ({self._compacted_rv})"}}
            return
        if since in (None, "", "0"):
            for obj in self._select(request):
                yield {"type": "ADDED", "object": obj}
            position = self._rv
        else:
            position = int(since)

        def relevant(resource: Any, obj: dict[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            return (
                resource == request.resource
                and (request.namespace is None or meta.get("namespace") == request.namespace)
                and (request.name is None or meta.get("name") == request.name)
                and match_labels(labels, meta.get("labels") or {})
                and match_fields(fields, obj)
            )

        while True:
            start = bisect.bisect_right(self._log_rvs, position)
            for rv, resource, type_, obj in self._log[start:]:
                position = rv
                if relevant(resource, obj):
                    yield {"type": type_, "object": obj}
            remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if (remaining is not None and remaining <= 0) or _disconnected(request) or epoch != self._watch_epoch:
                return
            # Wake up now and then: aiohttp does not cancel a handler whose client went away,
            # and a stream left waiting would count as a hung task when kopf stops.
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda seen=position: self._rv > seen), min(remaining or 0.2, 0.2)
                    )
                except asyncio.TimeoutError:
                    pass

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        obj = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
        if obj is None:
            raise K8sError(status=400, reason="BadRequest", message="body must be a JSON object")
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if not meta.get("name"):
            raise K8sError(status=422, reason="Invalid", message="metadata.name is required")
        info = self._info(request.resource)
        if info is not None and info.namespaced:
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        key = self._key(request, name=meta["name"], namespace=meta.get("namespace"))
        if self._get(key) is not None:
            raise K8sError(status=409, reason="AlreadyExists", message=f"{meta['name']} already exists")
        if self._has_status(request.resource):
            obj.pop("status", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1, resourceVersion=self._bump())
        self._store(key, obj)
        await self._emit(request.resource, "ADDED", obj)
        if request.resource.group == "apiextensions.k8s.io":
            self._register_crd(obj)
        return rendering.Response(status=201, payload=obj)

    async def _write(self, request: rendering.Request, key: Any, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Common tail of PATCH and PUT: subresource rules, versions, finalizer-driven deletion."""
        status_only = request.subresource == "status"
        if self._has_status(request.resource):
            if status_only:
                new = {**old, "status": new.get("status")} if "status" in new else {k: v for k, v in old.items() if k != "status"}
            elif "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        new["metadata"] = {**new.get("metadata", {}), **{k: old["metadata"][k] for k in ("uid", "creationTimestamp", "name") if k in old["metadata"]}}
        if "namespace" in old["metadata"]:
            new["metadata"]["namespace"] = old["metadata"]["namespace"]
        if old["metadata"].get("deletionTimestamp"):
            new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        generation = old["metadata"].get("generation", 1)
        new["metadata"]["generation"] = generation + 1 if strip(new) != strip(old) else generation
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op write does not bump the version (as the real API server)
        new["metadata"]["resourceVersion"] = self._bump()
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._store(key, new)
            self._objects[key].delete()
            await self._emit(request.resource, "DELETED", new)
        else:
            self._store(key, new)
            await self._emit(request.resource, "MODIFIED", new)
        return new

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        key = self._key(request)
        old = self._get(key)
        if old is None:
            raise K8sError(status=404, reason="NotFound", message=f"{request.name} not found")
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        patch = request.data
        if content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, patch, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise K8sError(status=422, reason="Invalid", message=f"the server rejected our request: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise K8sError(status=422, reason="Invalid", message=str(exc)) from exc
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise K8sError(status=400, reason="BadRequest", message="merge patch must be an object")
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
                raise K8sError(status=409, reason="Conflict", message="the object has been modified")
            new = _merge(old, _strip_directives(patch))
        else:
            raise K8sError(status=415, reason="UnsupportedMediaType", message=f"unsupported patch type {content_type!r}")
        return await self._write(request, key, old, new)

    async def _replace(self, request: rendering.Request) -> rendering.Payload:
        key = self._key(request)
        old = self._get(key)
        if old is None:
            raise K8sError(status=404, reason="NotFound", message=f"{request.name} not found")
        new = copy.deepcopy(request.data)
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise K8sError(status=409, reason="Conflict", message="the object has been modified")
        return await self._write(request, key, old, new)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        key = self._key(request)
        old = self._get(key)
        if old is None:
            raise K8sError(status=404, reason="NotFound", message=f"{request.name} not found")
        if old["metadata"].get("finalizers"):
            if not old["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=_now(), resourceVersion=self._bump())
                self._store(key, new)
                await self._emit(request.resource, "MODIFIED", new)
                return new
            return old
        old["metadata"]["resourceVersion"] = self._bump()
        self._objects[key].delete()
        await self._emit(request.resource, "DELETED", old)
        return old

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        answer = await super()._serve_version(request)
        if isinstance(answer, dict) and request.resource is not None and request.resource.group == "":
            answer["groupVersion"] = request.resource.version  # kmock says "/v1"
        return answer

    # --- test conveniences ----------------------------------------------------------------------

    async def drop_watches(self) -> None:
        """End every open watch stream, as a broken connection or an API server restart would."""
        self._watch_epoch += 1
        async with self._changed:
            self._changed.notify_all()

    def compact(self) -> None:
        """Forget the event log up to now: resuming a watch from before this answers 410 Gone."""
        self._compacted_rv = self._rv
        self._log.clear()
        self._log_rvs.clear()

    def fetch(self, key: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The live object (a copy) by "group/version/plural" key, or None."""
        return self._get((references.resource(key), namespace, name))

    def all(self, key: str, namespace: str | None = None) -> list[dict[str, Any]]:
        res = references.resource(key)
        return [
            copy.deepcopy(o.raw)
            for (r, ns, _), o in self._objects.items()
            if r == res and not o.deleted and (namespace is None or ns == namespace)
        ]

    async def set_status(self, key: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """What a controller would do (there are none here): write status and notify watchers."""
        res = references.resource(key)
        old = self._get((res, namespace, name))
        assert old is not None, (key, namespace, name)
        new = {**old, "status": status, "metadata": {**old["metadata"], "resourceVersion": self._bump()}}
        self._store((res, namespace, name), new)
        await self._emit(res, "MODIFIED", new)

    def requests_matching(self, method: str, path_regex: str) -> list[rendering.Request]:
        return [
            r for r in self._requests
            if str(r.method.value).upper() == method and re.search(path_regex, r.url.path)
        ]


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy (returning it), or fail with the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


__all__ = ["Emulator", "Fault", "eventually", "match_labels", "enums"]
