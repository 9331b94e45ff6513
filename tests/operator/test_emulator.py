"""The emulator closes the kmock gaps kopf depends on (TOOLING.md); each gap has a test here."""

from __future__ import annotations

import asyncio
import json

import kmock
import pytest
from emulator import Emulator, Fault, match_labels

CM = "/api/v1/namespaces/ns/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSONPATCH = {"Content-Type": "application/json-patch+json"}

pytestmark = pytest.mark.timeout(30)


def _cm(name, labels=None):
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels or {}}, "data": {"k": "v"}}


async def _json(resp_cm):
    async with resp_cm as resp:
        return resp.status, await resp.json()


async def test_metadata_versions_and_generation():
    async with Emulator() as em, kmock.Server(em):
        status, obj = await _json(em.post(CM, json=_cm("a")))
        meta = obj["metadata"]
        assert status == 201 and meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
        _, patched = await _json(em.patch(f"{CM}/a", json={"data": {"k": "w"}}, headers=MERGE))
        assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
        assert patched["metadata"]["generation"] == 2
        _, same = await _json(em.patch(f"{CM}/a", json={"metadata": {"labels": {"x": "1"}}}, headers=MERGE))
        assert same["metadata"]["generation"] == 2  # metadata-only change


async def test_failed_jsonpatch_test_is_422_and_stale_version_409():
    async with Emulator() as em, kmock.Server(em):
        await _json(em.post(CM, json=_cm("a")))
        bad = [{"op": "test", "path": "/metadata/resourceVersion", "value": "999"}]
        status, body = await _json(em.patch(f"{CM}/a", data=json.dumps(bad), headers=JSONPATCH))
        assert status == 422 and body["kind"] == "Status"
        status, _ = await _json(em.patch(f"{CM}/a", json={"metadata": {"resourceVersion": "999"}}, headers=MERGE))
        assert status == 409


async def test_list_has_kind_and_filters_labels():
    async with Emulator() as em, kmock.Server(em):
        await _json(em.post(CM, json=_cm("a", {"app": "x", "tier": "web"})))
        await _json(em.post(CM, json=_cm("b", {"app": "y"})))
        _, listing = await _json(em.get(CM, params={"labelSelector": "app=x"}))
        assert listing["kind"] == "ConfigMapList" and listing["apiVersion"] == "v1"
        assert [o["metadata"]["name"] for o in listing["items"]] == ["a"]
    assert match_labels("app in (x, y),!gone,tier!=db", {"app": "y"})
    assert not match_labels("app notin (x)", {"app": "x"})


async def test_watch_replays_changes_after_the_listed_version():
    async with Emulator() as em, kmock.Server(em):
        await _json(em.post(CM, json=_cm("a")))
        _, listing = await _json(em.get(CM))
        listed = listing["metadata"]["resourceVersion"]
        await _json(em.post(CM, json=_cm("b")))  # happens between list and watch
        params = {"watch": "true", "resourceVersion": listed, "timeoutSeconds": "1"}
        async with em.get(CM, params=params) as resp:
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line.strip()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "b")]


async def test_status_subresource_and_finalizers():
    async with Emulator() as em, kmock.Server(em):
        dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "finalizers": ["x/y"]}, "spec": {}}
        path = "/apis/apps/v1/namespaces/ns/deployments"
        await _json(em.post(path, json=dep))
        _, obj = await _json(em.patch(f"{path}/d", json={"status": {"readyReplicas": 1}}, headers=MERGE))
        assert "status" not in obj  # the main resource ignores status
        _, obj = await _json(em.patch(f"{path}/d/status", json={"status": {"readyReplicas": 1}}, headers=MERGE))
        assert obj["status"] == {"readyReplicas": 1}
        _, obj = await _json(em.delete(f"{path}/d"))
        assert obj["metadata"]["deletionTimestamp"]  # held by the finalizer
        await _json(em.patch(f"{path}/d", json={"metadata": {"finalizers": None}}, headers=MERGE))
        status, _ = await _json(em.get(f"{path}/d"))
        assert status == 404


async def test_crd_registers_resource_and_faults_are_injected():
    async with Emulator() as em, kmock.Server(em):
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "things.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"plural": "things", "kind": "Thing", "shortNames": ["th"]},
                     "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}}}]},
        }
        await _json(em.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd))
        _, discovery = await _json(em.get("/apis/example.com/v1"))
        assert {r["name"] for r in discovery["resources"]} == {"things", "things/status"}
        em.faults.append(Fault(method="POST", path="/things$", status=409, times=1))
        em.faults.append(Fault(method="GET", path="/things$", status=None, delay_s=0.3))
        body = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "t"}}
        assert (await _json(em.post("/apis/example.com/v1/namespaces/ns/things", json=body)))[0] == 409
        assert (await _json(em.post("/apis/example.com/v1/namespaces/ns/things", json=body)))[0] == 201
        started = asyncio.get_running_loop().time()
        await _json(em.get("/apis/example.com/v1/namespaces/ns/things"))
        assert asyncio.get_running_loop().time() - started >= 0.3
