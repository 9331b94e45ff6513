"""The router: its Deployment, Service, and the ConfigMap that tells it pools and weights.

The ConfigMap is the contract between the control plane and the router (`stepfleet router
--config /etc/stepfleet/router.yaml`). Data format, key `router.yaml`:

    version: 1                      # format version; bump on incompatible changes
    service: NAME                   # the DiffusionService
    model: SOURCE                   # spec.model.source, for /v1/models
    pools:                          # every pool in spec order
      - name: l4
        url: http://NAME-l4.NS.svc.cluster.local:8001
        weight: 0.75                # share of new requests; weights sum to 1 (or all 0)
        accelerator: nvidia-gpu
        pricePerHour: 0.8048

Weight changes must not restart the router (weights move every control-loop interval), so
the pod template does not hash the ConfigMap; the router re-reads the mounted file when it
changes (the kubelet refreshes mounted ConfigMaps within about a minute).
"""

from __future__ import annotations

from typing import Any

import yaml

from stepfleet.operator import names
from stepfleet.operator.children import secrets
from stepfleet.operator.children.common import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    Manifest,
    Observed,
    Owner,
    http_probe,
    metadata,
    resources,
)
from stepfleet.operator.children.workers import pool_url
from stepfleet.operator.models import DiffusionServiceSpec, PoolSpec

CONFIG_VERSION = 1
_DEFAULT_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


def default_weights(pools: list[PoolSpec]) -> dict[str, float]:
    """Starting weights before the control loop has spoken: by the capacity each pool starts with.

    A pool's share is min replicas x measured throughput (1 image/s when unmeasured), so a
    scale-to-zero pool gets no traffic; with no capacity anywhere, weights are equal.
    """
    raw = {p.name: p.min_replicas * (p.throughput_per_replica or 1.0) for p in pools}
    total = sum(raw.values())
    if total <= 0:
        return {p.name: round(1.0 / len(pools), 6) for p in pools}
    return {name: round(v / total, 6) for name, v in raw.items()}


def weights(pools: list[PoolSpec], observed: Observed) -> dict[str, float]:
    """Keep the control loop's weights while the set of pools is the same; else start afresh."""
    if observed.weights and set(observed.weights) == {p.name for p in pools}:
        return {p.name: float(observed.weights[p.name]) for p in pools}
    return default_weights(pools)


def config(owner: Owner, spec: DiffusionServiceSpec, observed: Observed) -> dict[str, Any]:
    """The router configuration as data (what `router.yaml` holds)."""
    w = weights(spec.pools, observed)
    out: dict[str, Any] = {
        "version": CONFIG_VERSION,
        "service": owner.name,
        "model": spec.model.source,
        "pools": [
            {
                "name": p.name,
                "url": pool_url(owner, p.name),
                "weight": w[p.name],
                "accelerator": p.accelerator.type,
                "pricePerHour": p.price_per_hour,
            }
            for p in spec.pools
        ],
    }
    if observed.control is not None:  # the loop's decisions, for the router's GET /v1/fleet
        out["control"] = observed.control
    return out


def parse_config(text: str) -> dict[str, Any]:
    """Read `router.yaml` back (the operator uses it to keep the control loop's weights)."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or data.get("version") != CONFIG_VERSION:
        raise ValueError(f"unsupported router config: {str(data)[:80]}")
    return data


def configmap(owner: Owner, spec: DiffusionServiceSpec, observed: Observed) -> Manifest:
    text = "# Written by stepfleet-operator; edits are overwritten.\n" + yaml.safe_dump(
        config(owner, spec, observed), sort_keys=False
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, names.router(owner.name), names.router_labels(owner.name)),
        "data": {names.ROUTER_CONFIG_KEY: text},
    }


def _secret_files(spec: DiffusionServiceSpec) -> tuple[list[str], list[secrets.MountedSecret]]:
    """The router's flags for its API keys file and worker token, and the Secrets they name."""
    args: list[str] = []
    mounted: list[secrets.MountedSecret] = []
    keys, token = secrets.api_keys(spec.security), secrets.worker_token(spec.security)
    if keys is not None:
        args += ["--api-keys-file", keys.path]
        mounted.append(keys)
    if token is not None:
        args += ["--worker-token-file", token.path]
        mounted.append(token)
    return args, mounted


def deployment(owner: Owner, spec: DiffusionServiceSpec) -> Manifest:
    labels = names.router_labels(owner.name)
    secret_args, mounted = _secret_files(spec)
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.router.image or names.default_image("cpu"),
        "imagePullPolicy": "IfNotPresent",
        # A pod's command replaces the image's: listen on every interface, on the port the Service targets.
        "command": ["stepfleet", "router", "--config", f"{names.ROUTER_CONFIG_DIR}/{names.ROUTER_CONFIG_KEY}",
                    "--host", "0.0.0.0", "--port", str(names.ROUTER_PORT), *secret_args],
        "ports": [{"name": "http", "containerPort": names.ROUTER_PORT, "protocol": "TCP"}],
        "resources": resources(spec.router.resources, _DEFAULT_RESOURCES),
        "readinessProbe": http_probe("/readyz", period=5, failures=3),
        "livenessProbe": http_probe("/healthz", period=10, failures=3),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "config", "mountPath": names.ROUTER_CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *(m.mount for m in mounted),
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, names.router(owner.name), labels),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": names.router_selector(owner.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(names.ROUTER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "securityContext": dict(POD_SECURITY),
                    "enableServiceLinks": False,
                    # Its own ServiceAccount, allowed only to read EndpointSlices (see `role`).
                    "serviceAccountName": names.router(owner.name),
                    "automountServiceAccountToken": True,
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.router(owner.name)}},
                        {"name": "tmp", "emptyDir": {}},
                        *(m.volume for m in mounted),
                    ],
                },
            },
        },
    }


#: All the router may do with the API: find its pools' worker pods (serving/router/discovery.py),
#: so it dials pods directly instead of letting kube-proxy pick one at random.
ROUTER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]


def service_account(owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(owner, names.router(owner.name), names.router_labels(owner.name)),
    }


def role(owner: Owner) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(owner, names.router(owner.name), names.router_labels(owner.name)),
        "rules": [dict(rule) for rule in ROUTER_RULES],
    }


def role_binding(owner: Owner) -> Manifest:
    name = names.router(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(owner, name, names.router_labels(owner.name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def service(owner: Owner) -> Manifest:
    """The fleet's front door: port 80 inside the cluster, the OpenAI-compatible image API."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, names.router(owner.name), names.router_labels(owner.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": names.router_selector(owner.name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
