"""Finding a pool's workers: a static list, or the EndpointSlices of the pool's Service.

Routing to the Service's ClusterIP would let kube-proxy pick a pod at random and defeat
load-aware balancing, so in a cluster the router watches the pool Service's EndpointSlices
and dials pods directly. The watch sits behind `Discovery` (start/stop, an `on_change`
callback) so the app and its tests run on a static list; the parsing of slices is a pure
function tested with hand-written objects.

The kubernetes client is imported only when a watch starts (it reads KUBECONFIG on import).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from stepfleet.serving.router.config import RouterConfig

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Port name of the worker container and Service (operator/children/workers.py).
PORT_NAME = "http"

#: pool name -> worker URLs (None: nothing known, use the static list).
OnChange = Callable[[str, "list[str] | None"], None]


class Discovery(Protocol):
    def start(self, config: RouterConfig, on_change: OnChange) -> None: ...

    def update(self, config: RouterConfig) -> None: ...

    def stop(self) -> None: ...


class StaticDiscovery:
    """Workers are exactly what the config lists (`endpoints`, else the pool `url`)."""

    def start(self, config: RouterConfig, on_change: OnChange) -> None:
        pass

    def update(self, config: RouterConfig) -> None:
        pass

    def stop(self) -> None:
        pass


def service_of(url: str) -> tuple[str, str | None] | None:
    """(service, namespace) from a Service URL like http://NAME.NS.svc.cluster.local:8001."""
    host = urlsplit(url).hostname
    if not host or host.replace(".", "").isdigit():
        return None
    parts = host.split(".")
    if len(parts) == 1:
        return parts[0], None
    if len(parts) >= 3 and parts[2] == "svc" or len(parts) == 2:
        return parts[0], parts[1]
    return None


def _get(obj: Mapping[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(k)
    return obj


def endpoints_from_slices(slices: Iterable[Mapping[str, Any]], port_name: str = PORT_NAME) -> list[str]:
    """Ready worker URLs from EndpointSlice objects (dicts, camelCase as the API serves them).

    An endpoint counts when `conditions.ready` is not false (absent means ready, per the
    API) and it is not terminating. The port is the one named `port_name`, else the only
    port. IPv4/IPv6 slices both work; FQDN slices are skipped.
    """
    urls: set[str] = set()
    for s in slices:
        family = s.get("addressType", "IPv4")
        if family not in ("IPv4", "IPv6"):
            continue
        ports = s.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            if cond.get("ready") is False or cond.get("terminating") is True:
                continue
            for addr in ep.get("addresses") or []:
                host = f"[{addr}]" if family == "IPv6" else addr
                urls.add(f"http://{host}:{port}")
    return sorted(urls)


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class EndpointSliceDiscovery:
    """Watches EndpointSlices of each pool's Service (one thread per pool) and reports changes.

    Pools that list `endpoints` explicitly are not watched. A watch that fails is retried
    with backoff; until the first successful list, the pool uses its static URL (the Service),
    so the router still serves, just without per-pod balancing.
    """

    def __init__(self, namespace: str | None = None, backoff_s: float = 2.0) -> None:
        self.namespace = namespace or _own_namespace()
        self.backoff_s = backoff_s
        self._on_change: OnChange | None = None
        self._threads: dict[str, tuple[threading.Event, threading.Thread, tuple[str, str]]] = {}
        self._api: Any = None

    def start(self, config: RouterConfig, on_change: OnChange) -> None:
        from kubernetes import client
        from kubernetes import config as kconfig

        try:
            kconfig.load_incluster_config()
        except Exception:
            kconfig.load_kube_config()
        self._api = client.DiscoveryV1Api()
        self._on_change = on_change
        self.update(config)

    def update(self, config: RouterConfig) -> None:
        wanted: dict[str, tuple[str, str]] = {}
        for p in config.pools:
            svc = service_of(p.url) if p.url and not p.endpoints else None
            if svc is not None:
                wanted[p.name] = (svc[0], svc[1] or self.namespace)
        for pool in list(self._threads):
            if wanted.get(pool) != self._threads[pool][2]:
                self._stop_one(pool)
        for pool, target in wanted.items():
            if pool not in self._threads:
                stop = threading.Event()
                t = threading.Thread(target=self._watch, args=(pool, target, stop), daemon=True,
                                     name=f"stepfleet-slices-{pool}")
                self._threads[pool] = (stop, t, target)
                t.start()

    def _stop_one(self, pool: str) -> None:
        stop, _, _ = self._threads.pop(pool)
        stop.set()
        if self._on_change:
            self._on_change(pool, None)

    def stop(self) -> None:
        for pool in list(self._threads):
            self._stop_one(pool)

    def _watch(self, pool: str, target: tuple[str, str], stop: threading.Event) -> None:
        from kubernetes import watch

        service, namespace = target
        selector = f"{SERVICE_NAME_LABEL}={service}"
        sanitize = self._api.api_client.sanitize_for_serialization
        while not stop.is_set():
            try:
                listing = self._api.list_namespaced_endpoint_slice(namespace, label_selector=selector)
                slices = {s.metadata.name: sanitize(s) for s in listing.items}
                self._emit(pool, slices, stop)
                w = watch.Watch()
                for event in w.stream(self._api.list_namespaced_endpoint_slice, namespace,
                                      label_selector=selector, resource_version=listing.metadata.resource_version,
                                      timeout_seconds=300):
                    if stop.is_set():
                        w.stop()
                        break
                    obj = sanitize(event["object"])
                    name = _get(obj, "metadata", "name")
                    if event["type"] == "DELETED":
                        slices.pop(name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        slices[name] = obj
                    self._emit(pool, slices, stop)
            except Exception as exc:  # a watch must never take the router down
                log.warning("EndpointSlice watch for pool %s (%s/%s) failed: %s", pool, namespace, service, exc)
                stop.wait(self.backoff_s)

    def _emit(self, pool: str, slices: dict[str, Any], stop: threading.Event) -> None:
        if self._on_change and not stop.is_set():
            self._on_change(pool, endpoints_from_slices(slices.values()))


def _own_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


def make_discovery(mode: str, config: RouterConfig) -> Discovery:
    """`static`, `kubernetes`, or `auto` (EndpointSlices when in a cluster and a pool needs them)."""
    needs = any(p.url and not p.endpoints and service_of(p.url) for p in config.pools)
    if mode == "kubernetes" or (mode == "auto" and in_cluster() and needs):
        return EndpointSliceDiscovery()
    return StaticDiscovery()
