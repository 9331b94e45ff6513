"""Run the control loop at once when a pool loses ready replicas, not at its next interval.

The loop ticks every `spec.controlLoop.intervalSeconds` (30 s by default). A pool that loses
its ready replicas — an outage, a spot interruption, pods turning un-ready — costs every
request routed to it until the loop moves the weight and asks for replacements, so waiting
for the next tick costs up to a whole interval of that pool's traffic (measured in the
simulator: `outage` 0.98996 → 0.9903 with a 5 s reaction, `docs/simulator.md`).

The operator already watches its child Deployments (to keep the status's ready counts
current). `LossWatch` remembers each Deployment's last ready count and raises an alarm for
its service when the count falls below both the last one and what the Deployment asks for
(`spec.replicas`): a planned scale-down lowers `spec.replicas` first, so it raises none. The
loop's timer, which ticks every second, takes the alarm and runs early.

Pure bookkeeping with a lock (kopf runs sync handlers in threads); no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

ServiceKey = tuple[str, str]  # (namespace, service name)


def lost_ready(previous: int | None, ready: int, desired: int) -> bool:
    """Whether a ready count of `ready` after `previous` is a loss (not a planned scale-down)."""
    return previous is not None and ready < previous and ready < desired


class LossWatch:
    """Last ready counts per Deployment, and the services whose pools just lost some."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: dict[str, int] = {}
        self._alarms: set[ServiceKey] = set()

    def observe(self, service: ServiceKey, deployment: Mapping[str, Any]) -> bool:
        """Record a Deployment's state (a watch event); True when it raised an alarm."""
        meta = deployment.get("metadata") or {}
        uid = str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
        ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
        desired = int((deployment.get("spec") or {}).get("replicas") or 0)
        with self._lock:
            lost = lost_ready(self._ready.get(uid), ready, desired)
            self._ready[uid] = ready
            if lost:
                self._alarms.add(service)
        return lost

    def forget(self, deployment: Mapping[str, Any]) -> None:
        """A deleted Deployment: drop its count."""
        meta = deployment.get("metadata") or {}
        with self._lock:
            self._ready.pop(str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"), None)

    def take(self, service: ServiceKey) -> bool:
        """Whether `service` has an alarm (and clear it)."""
        with self._lock:
            if service in self._alarms:
                self._alarms.discard(service)
                return True
            return False
