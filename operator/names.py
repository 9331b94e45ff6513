"""Names and labels of everything the operator creates, in one place.

Children are found again by these labels (for status and for pruning pools that left the
spec), and the router and ServiceMonitor select on them, so they must never be spelled twice.
"""

from __future__ import annotations

from collections.abc import Mapping

from stepfleet.operator import models

FINALIZER = "stepfleet.io/finalizer"
MANAGED_BY = "stepfleet-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SERVICE = "stepfleet.io/service"
LABEL_POOL = "stepfleet.io/pool"
#: Cluster-scoped NodePools cannot carry owner references to a namespaced object; these say whose they are.
LABEL_OWNER_NAMESPACE = "stepfleet.io/owner-namespace"
LABEL_OWNER_NAME = "stepfleet.io/owner-name"
#: Annotation holding the last manifest the operator applied (for three-way patches).
ANNOTATION_APPLIED = "stepfleet.io/last-applied"

WORKER_PORT = 8001
ROUTER_PORT = 8000
ROUTER_CONFIG_KEY = "router.yaml"
ROUTER_CONFIG_DIR = "/etc/stepfleet"
DEFAULT_IMAGE_REPO = "ghcr.io/stepfleet/stepfleet"
#: Where Secrets are mounted (outside the router's ConfigMap mount, which is read-only).
SECRETS_DIR = "/var/run/stepfleet"
#: Default keys in the Secrets `spec.security` names.
API_KEYS_KEY = "api-keys"
WORKER_TOKEN_KEY = "token"


def worker(service: str, pool: str) -> str:
    """Deployment, Service and PodDisruptionBudget name of a pool."""
    return f"{service}-{pool}"


def router(service: str) -> str:
    """Router Deployment, Service and ConfigMap name."""
    return f"{service}-router"


def workers_policy(service: str) -> str:
    """The NetworkPolicy that guards every worker pool of a service."""
    return f"{service}-workers"


def nodepool(namespace: str, service: str, pool: str) -> str:
    """Cluster-wide NodePool name: the namespace keeps two services of one name apart."""
    return f"{namespace}-{service}-{pool}"


def base_labels(service: str) -> dict[str, str]:
    return {
        LABEL_NAME: "stepfleet",
        LABEL_INSTANCE: service,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_SERVICE: service,
    }


def worker_selector(service: str, pool: str) -> dict[str, str]:
    """Pod selector of a pool (immutable on a Deployment, so kept minimal)."""
    return {LABEL_SERVICE: service, LABEL_POOL: pool, LABEL_COMPONENT: "worker"}


def router_selector(service: str) -> dict[str, str]:
    return {LABEL_SERVICE: service, LABEL_COMPONENT: "router"}


def workers_selector(service: str) -> dict[str, str]:
    """Every worker pod of a service, whatever its pool (what the NetworkPolicy guards)."""
    return {LABEL_SERVICE: service, LABEL_COMPONENT: "worker"}


def worker_labels(service: str, pool: str) -> dict[str, str]:
    return {**base_labels(service), **worker_selector(service, pool)}


def router_labels(service: str) -> dict[str, str]:
    return {**base_labels(service), **router_selector(service)}


def nodepool_labels(namespace: str, service: str, pool: str) -> dict[str, str]:
    return {
        **base_labels(service),
        LABEL_POOL: pool,
        LABEL_OWNER_NAMESPACE: namespace,
        LABEL_OWNER_NAME: service,
    }


def selector_string(labels: Mapping[str, str]) -> str:
    """A label selector in the API's query syntax (`a=b,c=d`)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def default_image(flavour: str) -> str:
    """The published image for an accelerator flavour, tagged with this operator's version."""
    from stepfleet import __version__

    return f"{DEFAULT_IMAGE_REPO}:{__version__}-{flavour}"


CRD_API_VERSION = f"{models.API_GROUP}/{models.API_VERSION}"
