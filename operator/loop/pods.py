"""Reading Kubernetes objects the loop looks at: timestamps, a pod's pool, readiness, URLs.

Pure helpers over decoded objects (dicts), shared by the capacity signals and the scraper.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from stepfleet.operator import names

#: Container states that will not clear by themselves: the pod is scheduled but gives no capacity.
STUCK_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName",
     "CreateContainerError", "RunContainerError"}
)


def parse_time(value: Any) -> float | None:
    """Epoch seconds of a Kubernetes timestamp (`...Z`, with or without fractions)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")



def pod_pool(pod: Mapping[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_POOL)



def unready_since(pod: Mapping[str, Any]) -> tuple[float, bool] | None:
    """(since when a scheduled pod has not been Ready, whether a container is stuck), or None if ready/unscheduled."""
    status = pod.get("status") or {}
    if pod_ready(pod) or status.get("phase") not in ("Pending", "Running"):
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") != "True":
        return None  # not placed yet: the Unschedulable signal covers it
    ready = conditions.get("Ready") or {}
    since = (parse_time(ready.get("lastTransitionTime")) or parse_time(scheduled.get("lastTransitionTime"))
             or parse_time((pod.get("metadata") or {}).get("creationTimestamp")))
    if since is None:
        return None
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    stuck = any(((c.get("state") or {}).get("waiting") or {}).get("reason") in STUCK_REASONS for c in containers)
    return since, stuck



def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def _worker_url(pod: Mapping[str, Any], path: str) -> str | None:
    """`path` on a worker pod (its container port named `http`), or None without a pod IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = names.WORKER_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                port = int(p["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


def scrape_url(pod: Mapping[str, Any]) -> str | None:
    """Where a ready worker pod serves `/metrics`."""
    return _worker_url(pod, "/metrics") if pod_ready(pod) else None


def readyz_url(pod: Mapping[str, Any]) -> str | None:
    """Where a running but un-ready worker pod says why on `/readyz` (loading, or failed and why)."""
    if (pod.get("status") or {}).get("phase") != "Running" or pod_ready(pod):
        return None
    return _worker_url(pod, "/readyz")

