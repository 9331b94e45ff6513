"""Issue 19, finding 8: the operator under faults, against the emulated API server.

Each test plays one fault: the operator stopped in the middle of a reconcile; a service
deleted while its children exist and a NodePool delete failing in the finalizer; an invalid
spec edited into a valid one; a concurrent writer (409s on child PATCHes; the control loop
acting on a spec the reconcile has already replaced); a dropped watch and a `410 Gone`
relist. What must hold: the children converge to the spec with nothing duplicated, nothing
stale rolled back, and nothing lost silently.
"""

from __future__ import annotations

import asyncio
import datetime as dt

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

from stepfleet.operator import kube, names
from stepfleet.operator.children import Owner
from stepfleet.operator.loop import act
from stepfleet.operator.policy.model import Plan, PoolPlan
from stepfleet.operator.validation import validate

pytestmark = pytest.mark.timeout(60)


def _posts(em, kind: str) -> int:
    return len(em.requests_matching("POST", f"/{kind}$"))


async def test_an_operator_stopped_mid_reconcile_is_resumed_by_the_next_without_duplicates():
    async with emulator() as em:
        # The first worker Deployment's create hangs, then fails: the operator is stopped meanwhile,
        # with the ConfigMap, Services and a NodePool created and no Deployment, no status.
        stuck = Fault(method="POST", path=r"/deployments$", status=500, delay_s=1.0, times=1)
        em.faults.append(stuck)
        async with operator(em):
            await create(em, example("three-pool-fleet.yaml"))
            await eventually(lambda: stuck.hits == 1)
        half = children(em)
        assert ("ConfigMap", "sd15-router") in half and not any(kind == "Deployment" for kind, _ in half)
        assert not (em.fetch(DFS, NS, "sd15").get("status") or {}).get("observedGeneration")
        async with operator(em):
            obj = await reconciled(em)
        assert set(children(em)) == EXPECTED_THREE_POOL
        assert obj["status"]["observedGeneration"] == 1
        # what the first operator created was adopted, not created again
        assert _posts(em, "configmaps") == 1 and _posts(em, "nodepools") == 2 and _posts(em, "services") == 4


async def test_a_deleted_service_waits_for_its_nodepools_and_says_why():
    async with emulator() as em, operator(em):
        await create(em, example("three-pool-fleet.yaml"))
        await reconciled(em)
        failing = Fault(method="DELETE", path=r"/nodepools/ml-sd15-l4$", status=500, times=10_000)
        em.faults.append(failing)
        await delete(em, "sd15")
        warning = await eventually(lambda: [e for e in em.all("v1/events", NS) if e["reason"] == "CleanupFailed"])
        assert warning[0]["type"] == "Warning"
        assert "ml-sd15-l4" in warning[0]["message"] and names.FINALIZER in warning[0]["message"]
        obj = em.fetch(DFS, NS, "sd15")
        assert obj["metadata"]["deletionTimestamp"] and names.FINALIZER in obj["metadata"]["finalizers"]
        # the other NodePool was deleted all the same, and said so
        assert [n["metadata"]["name"] for n in em.all(NODEPOOLS)] == ["ml-sd15-l4"]
        cleaned = [e for e in em.all("v1/events", NS) if e["reason"] == "CleanedUp"]
        assert cleaned and "ml-sd15-inf2" in cleaned[0]["message"]
        # while deleting, nothing is rebuilt: the children stay as they were for the garbage collector
        nodepool_posts = _posts(em, "nodepools")
        em.faults.remove(failing)
        await eventually(lambda: em.fetch(DFS, NS, "sd15") is None)
        assert em.all(NODEPOOLS) == [] and _posts(em, "nodepools") == nodepool_posts
        assert em.fetch(DEPLOYMENTS, NS, "sd15-l4") is not None  # owner references: the garbage collector's


async def test_a_forbidden_nodepool_delete_is_retried_until_allowed():
    async with emulator() as em, operator(em):
        await create(em, example("three-pool-fleet.yaml"))
        await reconciled(em)
        forbidden = Fault(method="DELETE", path=r"/nodepools/", status=403, reason="Forbidden", times=3)
        em.faults.append(forbidden)
        await delete(em, "sd15")
        await eventually(lambda: em.fetch(DFS, NS, "sd15") is None, timeout=20)
        assert forbidden.times == 0 and em.all(NODEPOOLS) == []


async def test_an_invalid_spec_edited_to_a_valid_one_builds_everything():
    async with emulator() as em, operator(em):
        obj = example("three-pool-fleet.yaml")
        obj["spec"]["pools"][0]["accelerator"]["type"] = "amd-gpu"
        await create(em, obj)
        invalid = await reconciled(em)
        assert condition(invalid, "Ready")["reason"] == "InvalidSpec" and children(em) == {}
        pools = example("three-pool-fleet.yaml")["spec"]["pools"]
        await patch(em, "sd15", {"spec": {"pools": pools}})
        fixed = await reconciled(em, generation=2)
        assert set(children(em)) == EXPECTED_THREE_POOL
        ready = condition(fixed, "Ready")
        assert ready["reason"] == "Progressing" and "amd-gpu" not in ready["message"]
        assert ready["observedGeneration"] == 2
        assert [p["name"] for p in fixed["status"]["pools"]] == ["l4", "inf2", "tpu-v5e"]
        warnings = [e for e in em.all("v1/events", NS) if e["reason"] == "InvalidSpec"]
        assert len(warnings) == 1  # the valid spec posts no new one


async def test_conflicting_child_patches_are_retried_until_the_spec_holds():
    async with emulator() as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        await reconciled(em, "tiny")
        conflicts = Fault(method="PATCH", path=r"/deployments/tiny-(ondemand|spot)$", status=409, reason="Conflict",
                          times=3)
        em.faults.append(conflicts)
        await patch(em, "tiny", {"spec": {"serving": {"image": "registry.example/stepfleet:v2"}}})
        await reconciled(em, "tiny", generation=2)
        assert conflicts.times == 0
        for pool in ("ondemand", "spot"):
            container = em.fetch(DEPLOYMENTS, NS, f"tiny-{pool}")["spec"]["template"]["spec"]["containers"][0]
            assert container["image"] == "registry.example/stepfleet:v2"


def _plan(replicas: dict[str, int]) -> Plan:
    share = 1.0 / len(replicas)
    return Plan(mode="cost", reasons=("test",), pools=tuple(
        PoolPlan(name=name, replicas=n, weight=share, nodepool_limit=n, cost_per_hour=0.0)
        for name, n in replicas.items()))


async def test_the_loop_acting_on_a_replaced_spec_neither_recreates_nor_rolls_backchildren():
    """The loop read the spec and the Deployments; then the user edited the spec (dropped the spot
    pool, changed the image) and the reconcile applied it; then the loop acts on what it read."""
    async with emulator() as em, operator(em):
        old = example("cpu-fleet.yaml")
        await create(em, old)
        body = await reconciled(em, "tiny")
        read = {pool: em.fetch(DEPLOYMENTS, NS, f"tiny-{pool}") for pool in ("ondemand", "spot")}
        new = example("cpu-fleet.yaml")["spec"]
        new["pools"] = new["pools"][:1]
        await patch(em, "tiny", {"spec": {"pools": new["pools"], "serving": {"image": "registry.example/sf:v2"}}})
        await reconciled(em, "tiny", generation=2)
        assert em.fetch(DEPLOYMENTS, NS, "tiny-spot") is None  # pruned with its pool

        stale_spec, _ = validate("tiny", old["spec"])
        owner = Owner(name="tiny", namespace=NS, uid=body["metadata"]["uid"])
        client = kube.Client.for_host(str(em.url).rstrip("/"), keep_alive=False)
        try:
            plan = _plan({"ondemand": 2, "spot": 3})
            with pytest.raises(kube.ApiError) as conflict:
                await asyncio.to_thread(act.apply_plan, client, owner, stale_spec, plan, read)
        finally:
            client.close()
        assert conflict.value.status == 409  # a requeue: the next run reads the new spec
        assert em.fetch(DEPLOYMENTS, NS, "tiny-spot") is None  # not brought back to life
        ondemand = em.fetch(DEPLOYMENTS, NS, "tiny-ondemand")
        assert ondemand["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/sf:v2"
        assert "spot" not in em.fetch("v1/configmaps", NS, "tiny-router")["data"]["router.yaml"]


async def test_the_loop_is_not_held_back_by_status_changes_since_it_read():
    """A Deployment's status moves with every pod that becomes ready; only a spec change is a conflict."""
    async with emulator() as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        body = await reconciled(em, "tiny")
        read = {pool: em.fetch(DEPLOYMENTS, NS, f"tiny-{pool}") for pool in ("ondemand", "spot")}
        await em.set_status(DEPLOYMENTS, NS, "tiny-spot", {"replicas": 0, "readyReplicas": 0, "observedGeneration": 1})
        spec, _ = validate("tiny", example("cpu-fleet.yaml")["spec"])
        client = kube.Client.for_host(str(em.url).rstrip("/"), keep_alive=False)
        try:
            changes = await asyncio.to_thread(act.apply_plan, client, Owner("tiny", NS, body["metadata"]["uid"]),
                                              spec, _plan({"ondemand": 1, "spot": 2}), read)
        finally:
            client.close()
        assert "spot replicas 2" in changes
        assert em.fetch(DEPLOYMENTS, NS, "tiny-spot")["spec"]["replicas"] == 2


async def test_a_dropped_watch_and_a_410_relist_miss_no_change():
    async with emulator() as em, operator(em):
        await create(em, example("cpu-fleet.yaml"))
        await reconciled(em, "tiny")
        # The watch breaks, and while it is down the spec changes and the API server compacts its
        # history: resuming from the last seen resourceVersion answers 410 Gone, kopf lists again.
        lists = len(_dfs_lists(em))
        # the re-watch is held back until the spec changed and the history is gone
        em.faults.append(Fault(method="GET", path=r"/diffusionservices$", status=None, delay_s=0.3, times=1))
        await em.drop_watches()
        await patch(em, "tiny", {"spec": {"router": {"replicas": 3}}})
        em.compact()
        obj = await reconciled(em, "tiny", generation=2)
        assert len(_dfs_lists(em)) > lists  # it listed again after the 410
        assert em.fetch(DEPLOYMENTS, NS, "tiny-router")["spec"]["replicas"] == 3
        assert obj["status"]["observedGeneration"] == 2
        # a plain dropped watch (no compaction) resumes where it stopped
        await em.drop_watches()
        await patch(em, "tiny", {"spec": {"router": {"replicas": 1}}})
        await reconciled(em, "tiny", generation=3)
        assert em.fetch(DEPLOYMENTS, NS, "tiny-router")["spec"]["replicas"] == 1


def _dfs_lists(em) -> list:
    return [r for r in em.requests_matching("GET", r"/diffusionservices$") if not r.params.get("watch")]


def test_cleanup_events_name_what_failed():
    from stepfleet.operator import conditions as cond

    event = cond.cleanup_failed_event({"name": "sd15", "namespace": NS, "uid": "u"},
                                      ["NodePool ml-sd15-l4: 403 Forbidden: no"], dt.datetime(2026, 1, 1))
    assert event["type"] == "Warning" and event["reason"] == "CleanupFailed"
    assert "ml-sd15-l4: 403" in event["message"]
