"""The thin client layer: the only module that talks to the Kubernetes API.

Deliberately small and generic (get, list, create, merge-patch, delete, discovery, events)
over the official client's `ApiClient`, so authentication (in-cluster or kubeconfig) is the
client's job while paths and payloads stay plain dicts, exactly what the pure builders
produce. Synchronous on purpose: kopf runs sync handlers in worker threads, and a sync
client inside an async handler would block the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import kubernetes


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
CONFIGMAP = Kind("v1", "ConfigMap", "configmaps")
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
SERVICEMONITOR = Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors")
NODEPOOL = Kind("karpenter.sh/v1", "NodePool", "nodepools", namespaced=False)
EVENT = Kind("v1", "Event", "events")
#: The router's identity: it lists and watches its pools' EndpointSlices.
SERVICEACCOUNT = Kind("v1", "ServiceAccount", "serviceaccounts")
ROLE = Kind("rbac.authorization.k8s.io/v1", "Role", "roles")
ROLEBINDING = Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
#: Lets only the router (and scrapers) reach a service's workers.
NETWORKPOLICY = Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
DIFFUSIONSERVICE = Kind("stepfleet.io/v1alpha1", "DiffusionService", "diffusionservices")
#: Read by the control loop only (pending pods, Karpenter's launch attempts).
POD = Kind("v1", "Pod", "pods")
NODECLAIM = Kind("karpenter.sh/v1", "NodeClaim", "nodeclaims", namespaced=False)

KINDS: dict[tuple[str, str], Kind] = {
    (k.api_version, k.kind): k
    for k in (DEPLOYMENT, SERVICE, CONFIGMAP, PDB, SERVICEMONITOR, NODEPOOL, EVENT, DIFFUSIONSERVICE, POD, NODECLAIM,
              SERVICEACCOUNT, ROLE, ROLEBINDING, NETWORKPOLICY)
}


def kind_of(manifest: dict[str, Any]) -> Kind:
    return KINDS[(manifest["apiVersion"], manifest["kind"])]


class ApiError(Exception):
    """A non-2xx answer from the API server (or no answer at all: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def retryable(self) -> bool:
        """Conflicts, throttling, server errors and timeouts are worth retrying; 4xx rejections are not."""
        return self.status in (0, 409, 429) or self.status >= 500


class Client:
    """Plain-dict access to the API, raising `ApiError` on failure."""

    def __init__(self, api: kubernetes.client.ApiClient, timeout_s: float = 30.0, keep_alive: bool = True) -> None:
        self.api = api
        self.timeout_s = timeout_s
        self.keep_alive = keep_alive

    @classmethod
    def from_environment(cls) -> Client:
        """In-cluster service account if there is one, else the local kubeconfig."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        return cls(kubernetes.client.ApiClient())

    @classmethod
    def for_host(cls, host: str, timeout_s: float = 10.0, keep_alive: bool = True) -> Client:
        """A client for an unauthenticated endpoint (tests, `kubectl proxy`)."""
        config = kubernetes.client.Configuration(host=host)
        return cls(kubernetes.client.ApiClient(config), timeout_s=timeout_s, keep_alive=keep_alive)

    def close(self) -> None:
        """Drop pooled connections (an idle keep-alive would hold a test server's shutdown)."""
        self.api.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        try:
            _, url, headers, serialized, _ = self.api.param_serialize(
                method,
                path,
                query_params=list((query or {}).items()),
                header_params={
                    "Content-Type": content_type,
                    "Accept": "application/json",
                    **({} if self.keep_alive else {"Connection": "close"}),
                },
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self.api.call_api(method, url, header_params=headers, body=serialized, _request_timeout=self.timeout_s)
            resp.read()
        except Exception as exc:  # connection refused, timeouts: the API is unreachable
            raise ApiError(0, type(exc).__name__, str(exc)) from exc
        data = resp.data
        if not 200 <= resp.status < 300:
            reason, message = str(resp.reason or ""), ""
            try:
                status_body = json.loads(data or b"{}")
                reason = status_body.get("reason") or reason
                message = status_body.get("message") or ""
            except (ValueError, TypeError, AttributeError):
                message = str(data)[:200]
            raise ApiError(resp.status, reason, message)
        return json.loads(data) if data else None

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", kind.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, kind: Kind, namespace: str | None, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        """Objects of a kind (all namespaces when `namespace` is None for a namespaced kind);
        an API that is not served (e.g. no Karpenter) has none."""
        query = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v} or None
        try:
            return list((self._call("GET", kind.path(namespace), query=query) or {}).get("items", []))
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind = kind_of(manifest)
        return self._call("POST", kind.path(manifest["metadata"].get("namespace")), body=manifest)

    def patch(
        self, kind: Kind, namespace: str | None, name: str, patch: dict[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386): `None` removes a key, lists are replaced whole."""
        return self._call(
            "PATCH", kind.path(namespace, name, subresource), body=patch, content_type="application/merge-patch+json"
        )

    def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        """Delete with background propagation; False if it was already gone."""
        try:
            self._call("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def serves(self, kind: Kind) -> bool:
        """Whether the API server serves a kind (e.g. the Prometheus operator's CRDs are installed)."""
        try:
            resources = self._call("GET", f"/apis/{kind.api_version}") or {}
        except ApiError as exc:
            if exc.status in (403, 404):
                return False
            raise
        return any(r.get("name") == kind.plural for r in resources.get("resources", []))

    def post_event(self, event: dict[str, Any]) -> None:
        self.create(event)
