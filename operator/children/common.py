"""Pieces every child manifest shares: the owner, object metadata, the pod security baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stepfleet.operator import names
from stepfleet.operator.models import NetworkPeer, Resources

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Owner:
    """The DiffusionService a child belongs to (what an owner reference needs)."""

    name: str
    namespace: str
    uid: str
    generation: int = 1

    def reference(self) -> dict[str, Any]:
        """Owner reference for namespaced children: garbage-collected with the service."""
        return {
            "apiVersion": names.CRD_API_VERSION,
            "kind": "DiffusionService",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class Observed:
    """What the builders must carry over from the cluster instead of overwriting.

    Replicas and router weights belong to the control loop once a pool exists; a spec
    reconcile only clamps replicas into [min, max] and keeps weights while the set of pools
    is unchanged.
    """

    replicas: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    #: The router config's `control` section (the loop's last decisions, `policy.records`).
    control: dict[str, Any] | None = None
    servicemonitor_available: bool = False
    #: Who scrapes the workers besides what the spec names: the operator itself (its control loop
    #: reads `/metrics` and `/readyz` of pods), from `stepfleet operator --metrics-from`.
    metrics_peers: tuple[NetworkPeer, ...] = ()


def metadata(owner: Owner, name: str, labels: dict[str, str], *, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespaced:
        meta["namespace"] = owner.namespace
        meta["ownerReferences"] = [owner.reference()]
    return meta


#: Pod-level security: non-root with a fixed uid matching the image's user, RuntimeDefault seccomp.
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}

#: Container-level security: nothing escalates, nothing writes outside the mounted volumes.
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def resources(overrides: Resources | None, defaults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge a spec's CPU/memory overrides over defaults (Kubernetes wants quantities as strings)."""
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in defaults.items()}
    if overrides is not None:
        out.setdefault("requests", {}).update(overrides.requests)
        out.setdefault("limits", {}).update(overrides.limits)
    return {k: {rk: str(rv) for rk, rv in v.items()} for k, v in out.items() if v}


def http_probe(path: str, *, period: int, failures: int, initial: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }
    if initial:
        probe["initialDelaySeconds"] = initial
    return probe
