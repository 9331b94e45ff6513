"""The NetworkPolicy that lets only the router (and named scrapers) reach a service's workers.

Workers answer the whole image API on their port, and before issue 19 anyone who could reach
a pod could use it. This policy selects every worker pod of the service and admits, on the
worker port only: the service's router pods; the operator itself (its control loop scrapes
`/metrics` and asks `/readyz` of pods directly, `--metrics-from`); and the peers in
`spec.security.metricsFrom` (a Prometheus). A NetworkPolicy admits ports, not paths: the
worker token (`spec.security.workerToken`) is what keeps those scrapers to the open paths
(`/healthz`, `/readyz`, `/metrics`). Egress is left alone: workers may need to download a
model. Kubelet probes come from the node, which network plugins let through.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stepfleet.operator import names
from stepfleet.operator.children.common import Manifest, Owner, metadata
from stepfleet.operator.models import DiffusionServiceSpec, NetworkPeer

#: The label the API server sets on every namespace (Kubernetes >= 1.21): a namespace by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def peer(owner: Owner, who: NetworkPeer) -> dict[str, Any]:
    """A NetworkPolicy peer: pods with these labels (all, if none) in that namespace (default: the owner's)."""
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: who.namespace or owner.namespace}},
        "podSelector": {"matchLabels": dict(who.pod_labels)} if who.pod_labels else {},
    }


def workers_policy(owner: Owner, spec: DiffusionServiceSpec, scrapers: Iterable[NetworkPeer] = ()) -> Manifest:
    """Ingress to the service's workers: the router, then the scrapers (the operator's and the spec's)."""
    port = [{"port": "http", "protocol": "TCP"}]
    ingress: list[dict[str, Any]] = [
        # Same namespace, so a bare podSelector: the router pods of this service only.
        {"from": [{"podSelector": {"matchLabels": names.router_selector(owner.name)}}], "ports": port},
    ]
    others: list[dict[str, Any]] = []
    for who in (*scrapers, *spec.security.metrics_from):
        p = peer(owner, who)
        if p not in others:
            others.append(p)
    if others:
        ingress.append({"from": others, "ports": port})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(owner, names.workers_policy(owner.name), names.base_labels(owner.name)),
        "spec": {
            "podSelector": {"matchLabels": names.workers_selector(owner.name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
