"""Karpenter `NodePool`s (karpenter.sh/v1) for pools whose spec asks for one.

Requirements come from the accelerator: the GPU name for NVIDIA, the instance family for
Neuron chips, general-purpose families for CPU. The pool's pods select the NodePool by
Karpenter's `karpenter.sh/nodepool` label and tolerate its accelerator taint, so nothing
else lands on (expensive) accelerator nodes. Limits default to what `maxReplicas` replicas
need, so a runaway scale-up cannot buy unbounded capacity.

NodePools are cluster-scoped: no owner reference can point at a namespaced service, so
they carry owner labels and the operator's finalizer deletes them.
"""

from __future__ import annotations

from typing import Any

from stepfleet.operator import accelerators, names
from stepfleet.operator.children.common import Manifest, Owner, metadata
from stepfleet.operator.models import PoolSpec

DEFAULT_CPU_CATEGORIES = ("c", "m")


def _requirement(key: str, values: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


def requirements(pool: PoolSpec) -> list[dict[str, Any]]:
    assert pool.node_pool is not None
    acc = pool.accelerator
    mapping = accelerators.DEVICES[acc.type]
    reqs = [
        _requirement("kubernetes.io/arch", ["amd64"]),
        _requirement("kubernetes.io/os", ["linux"]),
        _requirement("karpenter.sh/capacity-type", pool.node_pool.capacity_types),
    ]
    families = list(pool.node_pool.instance_families) or list(mapping.families_by_model.get(acc.model or "", ()))
    if mapping.karpenter_model_key and acc.model:
        reqs.append(_requirement(mapping.karpenter_model_key, [acc.model.lower()]))
    if families:
        reqs.append(_requirement("karpenter.k8s.aws/instance-family", families))
    elif acc.type == "cpu" and not pool.node_pool.instance_types:
        reqs.append(_requirement("karpenter.k8s.aws/instance-category", DEFAULT_CPU_CATEGORIES))
    if pool.node_pool.instance_types:
        reqs.append(_requirement("node.kubernetes.io/instance-type", pool.node_pool.instance_types))
    return reqs


def limits(pool: PoolSpec) -> dict[str, str]:
    assert pool.node_pool is not None
    if pool.node_pool.limits is not None:
        return {k: str(v) for k, v in pool.node_pool.limits.items()}
    acc = pool.accelerator
    resource = acc.resource_name or accelerators.DEVICES[acc.type].resource_name
    if resource is None:  # cpu pools: bound CPUs, assuming at most 16 per replica's node
        return {"cpu": str(max(1, pool.max_replicas) * 16)}
    return {resource: str(max(1, pool.max_replicas) * acc.devices)}


def nodepool(owner: Owner, pool: PoolSpec) -> Manifest:
    assert pool.node_pool is not None
    mapping = accelerators.DEVICES[pool.accelerator.type]
    name = names.nodepool(owner.namespace, owner.name, pool.name)
    template_spec: dict[str, Any] = {
        "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": pool.node_pool.node_class},
        "requirements": requirements(pool),
        "expireAfter": "720h",
    }
    if mapping.taint_key:
        template_spec["taints"] = [{"key": mapping.taint_key, "effect": "NoSchedule"}]
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "metadata": metadata(owner, name, names.nodepool_labels(owner.namespace, owner.name, pool.name), namespaced=False),
        "spec": {
            "template": {
                "metadata": {"labels": {names.LABEL_SERVICE: owner.name, names.LABEL_POOL: pool.name}},
                "spec": template_spec,
            },
            "limits": limits(pool),
            "disruption": {
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": pool.node_pool.consolidate_after,
            },
        },
    }
