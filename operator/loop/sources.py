"""The loop's I/O adapters: Kubernetes reads, Prometheus queries, worker scrapes and readiness.

Each adapter only fetches and decodes; every rule about what the data means is in
the pure modules `observe` lists. Kubernetes goes through `kube.Client` (the only module that talks to the API);
HTTP to Prometheus and to workers through one `httpx.Client` with a short timeout, so a
hung endpoint delays a tick by seconds, not forever. Any failure is an `ObservationError`
carrying a message fit for a condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from stepfleet.operator import kube, names
from stepfleet.operator.children import Owner
from stepfleet.operator.models import DiffusionServiceSpec

from .capacity import INSUFFICIENT_CAPACITY_REASON
from .errors import ObservationError


@dataclass(frozen=True)
class ClusterView:
    """The Kubernetes objects one tick looks at."""

    #: pool -> its worker Deployment (None if missing).
    deployments: Mapping[str, dict[str, Any] | None]
    #: The service's worker pods.
    pods: list[dict[str, Any]]
    #: Karpenter InsufficientCapacityError Events on NodeClaims, in any namespace.
    capacity_events: list[dict[str, Any]]
    #: NodeClaims (fetched only when such events exist).
    nodeclaims: list[dict[str, Any]]


def read_cluster(client: kube.Client, owner: Owner, spec: DiffusionServiceSpec) -> ClusterView:
    try:
        deployments = {
            p.name: client.get(kube.DEPLOYMENT, owner.namespace, names.worker(owner.name, p.name)) for p in spec.pools
        }
        pods = client.list(
            kube.POD,
            owner.namespace,
            names.selector_string({names.LABEL_SERVICE: owner.name, names.LABEL_COMPONENT: "worker"}),
        )
        events: list[dict[str, Any]] = []
        claims: list[dict[str, Any]] = []
        if any(p.node_pool is not None for p in spec.pools):
            events = client.list(
                kube.EVENT, None, fields=f"reason={INSUFFICIENT_CAPACITY_REASON},involvedObject.kind=NodeClaim"
            )
            if events:
                claims = client.list(kube.NODECLAIM, None)
    except kube.ApiError as exc:
        raise ObservationError(f"reading the cluster failed: {exc}") from exc
    return ClusterView(deployments=deployments, pods=pods, capacity_events=events, nodeclaims=claims)


def _get(http: httpx.Client, url: str, params: Mapping[str, str] | None = None) -> httpx.Response:
    try:
        return http.get(url, params=params)
    except httpx.HTTPError as exc:
        raise ObservationError(f"{url}: {type(exc).__name__}: {exc}") from exc


def query_prometheus(http: httpx.Client, base_url: str, queries: Mapping[str, str]) -> dict[str, Any]:
    """Decoded `/api/v1/query` answers, by the same keys as `queries`."""
    url = base_url.rstrip("/") + "/api/v1/query"
    out: dict[str, Any] = {}
    for key, query in queries.items():
        resp = _get(http, url, {"query": query})
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200:
            detail = body.get("error") if isinstance(body, dict) else resp.text[:200]
            raise ObservationError(f"Prometheus answered {resp.status_code} to the {key} query: {detail}")
        if body is None:
            raise ObservationError(f"Prometheus answered the {key} query with non-JSON: {resp.text[:120]!r}")
        out[key] = body
    return out


def scrape(http: httpx.Client, urls: Mapping[str, str]) -> dict[str, str]:
    """pod -> `/metrics` text of each worker."""
    out: dict[str, str] = {}
    for pod, url in urls.items():
        resp = _get(http, url)
        if resp.status_code != 200:
            raise ObservationError(f"scraping {pod} ({url}) answered {resp.status_code}")
        out[pod] = resp.text
    return out


#: A `/readyz` answers at once even while the model loads (loading runs beside the server);
#: a short limit keeps a tick quick when pods are unreachable from the operator.
READYZ_TIMEOUT_S = 2.0


def probe_readyz(
    http: httpx.Client, urls: Mapping[str, str], timeout_s: float = READYZ_TIMEOUT_S
) -> dict[str, tuple[int, str] | None]:
    """pod -> (status code, body) of its `/readyz`; None where it did not answer.

    Un-ready pods are often not listening yet, so no answer is not an error here.
    """
    out: dict[str, tuple[int, str] | None] = {}
    for pod, url in urls.items():
        try:
            resp = http.get(url, timeout=timeout_s)
        except httpx.HTTPError:
            out[pod] = None
            continue
        out[pod] = (resp.status_code, resp.text)
    return out
