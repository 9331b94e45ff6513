"""The operator end to end: kopf in-process, reconciling against the emulated API server."""

from __future__ import annotations

import asyncio
import time

import pytest
from emulator import Fault, eventually
from k8s_helpers import example
from operator_harness import (
    DEPLOYMENTS,
    DFS,
    EXPECTED_THREE_POOL,
    NODEPOOLS,
    NS,
    children,
    condition,
    create,
    delete,
    emulator,
    operator,
    patch,
    reconciled,
)

from stepfleet.operator import names

pytestmark = pytest.mark.timeout(60)

async def test_create_builds_every_child_with_owner_references():
    async with emulator() as em, operator(em):
        dfs = await create(em, example("three-pool-fleet.yaml"))
        obj = await reconciled(em)
        kids = children(em)
        assert set(kids) == EXPECTED_THREE_POOL
        for (kind, _), child in kids.items():
            if kind != "NodePool":
                (ref,) = child["metadata"]["ownerReferences"]
                assert ref["uid"] == dfs["metadata"]["uid"] and ref["kind"] == "DiffusionService"
        gpu = kids[("Deployment", "sd15-l4")]["spec"]["template"]["spec"]
        assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert gpu["nodeSelector"] == {"karpenter.sh/nodepool": "ml-sd15-l4"}
        assert names.FINALIZER in obj["metadata"]["finalizers"]
        status = obj["status"]
        assert [p["name"] for p in status["pools"]] == ["l4", "inf2", "tpu-v5e"]
        assert [p["replicas"] for p in status["pools"]] == [1, 1, 0]
        assert status["totalCostPerHour"] == pytest.approx(0.8048 + 0.7582)
        assert condition(obj, "Ready")["status"] == "False"  # nothing is ready yet
        assert condition(obj, "Ready")["reason"] == "Progressing"
        assert {c["type"] for c in status["conditions"]} == {"Ready", "Degraded", "CapacityShort"}
        # the Normal event tells what was created
        events = [e for e in em.all("v1/events", NS) if e["reason"] == "Reconciled"]
        assert events and "created Deployment sd15-l4" in events[0]["message"]


async def test_ready_counts_follow_deployment_status():
    async with emulator() as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        await reconciled(em, "tiny")
        await em.set_status(DEPLOYMENTS, NS, "tiny-ondemand", {"replicas": 1, "readyReplicas": 1})
        await em.set_status(DEPLOYMENTS, NS, "tiny-router", {"replicas": 1, "readyReplicas": 1})

        def ready():
            obj = em.fetch(DFS, NS, "tiny")
            return obj if (condition(obj, "Ready") or {}).get("status") == "True" else None

        obj = await eventually(ready)
        assert obj["status"]["pools"][0]["readyReplicas"] == 1
        assert condition(obj, "Degraded")["status"] == "False"


async def test_update_patches_children_and_prunes_removed_pool():
    async with emulator() as em, operator(em):
        await create(em, example("three-pool-fleet.yaml"))
        await reconciled(em)
        old_uid = em.fetch(DEPLOYMENTS, NS, "sd15-l4")["metadata"]["uid"]
        spec = example("three-pool-fleet.yaml")["spec"]
        spec["model"]["source"] = "hf://stabilityai/sd-turbo"
        spec["serving"]["image"] = "registry.example/stepfleet:dev"
        del spec["pools"][0]["nodePool"]  # l4 leaves Karpenter: its NodePool and selector go
        spec["pools"] = spec["pools"][:2]  # the TPU pool leaves the spec
        await patch(em, "sd15", {"spec": {"model": spec["model"], "serving": spec["serving"], "pools": spec["pools"]}})
        await reconciled(em, generation=2)

        kids = children(em)
        assert ("Deployment", "sd15-tpu-v5e") not in kids and ("Service", "sd15-tpu-v5e") not in kids
        assert ("NodePool", "ml-sd15-l4") not in kids and ("NodePool", "ml-sd15-inf2") in kids
        dep = kids[("Deployment", "sd15-l4")]
        assert dep["metadata"]["uid"] == old_uid  # patched in place, not recreated
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example/stepfleet:dev"
        assert container["command"][3] == "stabilityai/sd-turbo"
        assert "nodeSelector" not in dep["spec"]["template"]["spec"]
        cfg = kids[("ConfigMap", "sd15-router")]["data"]["router.yaml"]
        assert "tpu-v5e" not in cfg and "sd15-inf2" in cfg


async def test_control_loop_replicas_and_weights_survive_reconcile():
    async with emulator() as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        await reconciled(em, "tiny")
        # the control loop scales the spot pool and moves traffic to it
        async with em.patch(
            f"/apis/apps/v1/namespaces/{NS}/deployments/tiny-spot",
            json={"spec": {"replicas": 3}}, headers={"Content-Type": "application/merge-patch+json"},
        ):
            pass
        cm = em.fetch("v1/configmaps", NS, "tiny-router")
        text = cm["data"]["router.yaml"].replace("weight: 1.0", "weight: 0.25").replace("weight: 0.0", "weight: 0.75")
        async with em.patch(
            f"/api/v1/namespaces/{NS}/configmaps/tiny-router",
            json={"data": {"router.yaml": text}}, headers={"Content-Type": "application/merge-patch+json"},
        ):
            pass
        await patch(em, "tiny", {"spec": {"router": {"replicas": 2}}})
        await reconciled(em, "tiny", generation=2)
        assert em.fetch(DEPLOYMENTS, NS, "tiny-spot")["spec"]["replicas"] == 3
        assert em.fetch(DEPLOYMENTS, NS, "tiny-router")["spec"]["replicas"] == 2
        assert "weight: 0.75" in em.fetch("v1/configmaps", NS, "tiny-router")["data"]["router.yaml"]


async def test_delete_removes_nodepools_and_clears_finalizer():
    async with emulator() as em, operator(em):
        await create(em, example("three-pool-fleet.yaml"))
        await reconciled(em)
        assert len(em.all(NODEPOOLS)) == 2
        await delete(em, "sd15")
        await eventually(lambda: em.fetch(DFS, NS, "sd15") is None)
        assert em.all(NODEPOOLS) == []
        # namespaced children are left to the garbage collector (owner references), not deleted here
        assert em.fetch(DEPLOYMENTS, NS, "sd15-l4") is not None


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda s: s["pools"][0]["accelerator"].update(type="amd-gpu"), "spec.pools[0].accelerator.type"),
        (lambda s: s["model"].update(source="s3://bucket/sd15"), "spec.model.source"),
        (lambda s: s["pools"][2]["accelerator"].pop("topology"), "spec.pools[2].accelerator.topology"),
    ],
)
async def test_invalid_spec_sets_condition_and_warns_withoutchildren(mutate, field):
    async with emulator() as em, operator(em):
        obj = example("three-pool-fleet.yaml")
        mutate(obj["spec"])
        await create(em, obj)
        dfs = await reconciled(em)
        ready = condition(dfs, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec" and field in ready["message"]
        warnings = await eventually(lambda: [e for e in em.all("v1/events", NS) if e["type"] == "Warning"])
        assert warnings[0]["reason"] == "InvalidSpec" and field in warnings[0]["message"]
        assert warnings[0]["involvedObject"]["name"] == "sd15"
        assert children(em) == {}


async def test_invalid_update_leaves_children_unchanged():
    async with emulator() as em, operator(em):
        await create(em, example("three-pool-fleet.yaml"))
        await reconciled(em)
        before = children(em)
        await patch(em, "sd15", {"spec": {"model": {"source": "ftp://models/sd15"}}})
        dfs = await reconciled(em, generation=2)
        assert condition(dfs, "Ready")["reason"] == "InvalidSpec"
        assert children(em) == before


async def test_restart_creates_no_duplicates_and_writes_nothing():
    async with emulator() as em:
        async with operator(em):
            await create(em, example("three-pool-fleet.yaml"))
            await reconciled(em)
            await asyncio.sleep(0.3)  # let status refreshes from Deployment events settle
        before = children(em)
        writes_before = len(em.requests_matching("POST", "/(deployments|services|configmaps|nodepools)")) + len(
            em.requests_matching("PATCH", "/(deployments|services|configmaps|nodepools)/")
        )
        async with operator(em):
            # resume runs the reconcile again: wait until it has been seen reading the children
            start = len(em._requests)
            await eventually(lambda: any("/deployments/sd15-l4" in r.url.path for r in em._requests[start:]))
            await asyncio.sleep(0.3)
        assert children(em) == before
        writes_after = len(em.requests_matching("POST", "/(deployments|services|configmaps|nodepools)")) + len(
            em.requests_matching("PATCH", "/(deployments|services|configmaps|nodepools)/")
        )
        assert writes_after == writes_before


async def test_api_faults_are_retried_until_consistent():
    async with emulator() as em, operator(em):
        em.faults += [
            Fault(method="POST", path=r"/deployments$", status=409, times=2),  # conflicts
            Fault(method="GET", path=r"/configmaps/sd15-router$", status=500, times=2),
            Fault(method="POST", path=r"/nodepools$", status=503, times=1),
            Fault(method="PATCH", path=r"/diffusionservices/sd15", status=None, delay_s=0.5, times=1),  # slow
        ]
        started = time.monotonic()
        await create(em, example("three-pool-fleet.yaml"))
        await eventually(lambda: set(children(em)) == EXPECTED_THREE_POOL, timeout=20)
        await reconciled(em)
        assert all(f.times == 0 for f in em.faults), em.faults
        assert time.monotonic() - started < 20


async def test_servicemonitor_created_when_prometheus_operator_present():
    async with emulator(prometheus=True) as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        await reconciled(em, "tiny")
        (sm,) = em.all("monitoring.coreos.com/v1/servicemonitors", NS)
        assert sm["metadata"]["name"] == "tiny"
        assert sm["spec"]["selector"]["matchLabels"][names.LABEL_SERVICE] == "tiny"


async def test_without_karpenter_nodepools_are_reported_not_retried_forever():
    async with emulator(karpenter=False) as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        obj = await reconciled(em, "tiny")
        degraded = condition(obj, "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "KarpenterUnavailable"
        assert "ml-tiny-ondemand" in degraded["message"]
        assert em.fetch(DEPLOYMENTS, NS, "tiny-ondemand") is not None  # the rest is built
        warnings = [e for e in em.all("v1/events", NS) if e["reason"] == "KarpenterUnavailable"]
        assert warnings and warnings[0]["type"] == "Warning"


async def test_foreign_object_with_a_child_name_is_not_taken_over():
    async with emulator() as em, operator(em):
        foreign = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "tiny-router", "labels": {"team": "web"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
        }
        async with em.post(f"/api/v1/namespaces/{NS}/services", json=foreign) as resp:
            assert resp.status == 201
        await create(em, example("cpu-fleet.yaml"))
        obj = await reconciled(em, "tiny")
        degraded = condition(obj, "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "ChildConflict"
        assert "Service tiny-router" in degraded["message"]
        svc = em.fetch("v1/services", NS, "tiny-router")
        assert svc["spec"]["selector"] == {"app": "web"} and "ownerReferences" not in svc["metadata"]
        assert em.fetch(DEPLOYMENTS, NS, "tiny-ondemand") is not None  # the rest is built
