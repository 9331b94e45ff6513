"""Pure builders: a validated spec in, the complete list of child manifests out.

No I/O here. What the builders must not overwrite (replicas and weights the control loop
set, whether the ServiceMonitor API exists) comes in as `Observed`, read beforehand by the
thin client layer. Order matters only for readability of events: config before the
Deployments that mount it, Services before Deployments.
"""

from __future__ import annotations

from stepfleet.operator.children import monitoring, network, nodepools, router, workers
from stepfleet.operator.children.common import Manifest, Observed, Owner
from stepfleet.operator.models import DiffusionServiceSpec

__all__ = ["Manifest", "Observed", "Owner", "build_all"]


def build_all(owner: Owner, spec: DiffusionServiceSpec, observed: Observed) -> list[Manifest]:
    """Every child the service should have, given what was observed."""
    out: list[Manifest] = [router.configmap(owner, spec, observed), router.service(owner)]
    for pool in spec.pools:
        out.append(workers.service(owner, pool))
        out.append(workers.disruption_budget(owner, pool))
        if pool.node_pool is not None:
            out.append(nodepools.nodepool(owner, pool))
        out.append(workers.deployment(owner, spec, pool, observed))
    out += [router.service_account(owner), router.role(owner), router.role_binding(owner)]
    out.append(router.deployment(owner, spec))
    if spec.security.network_policy:
        out.append(network.workers_policy(owner, spec, observed.metrics_peers))
    if observed.servicemonitor_available:
        out.append(monitoring.servicemonitor(owner))
    return out
