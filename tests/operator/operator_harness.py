"""Run the real operator (kopf, in-process) against the emulator, with test-speed timings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import yaml
from emulator import Emulator, eventually
from k8s_helpers import CRD_PATH

from stepfleet.operator import handlers, kube, names

NS = "ml"
DFS = "stepfleet.io/v1alpha1/diffusionservices"
DEPLOYMENTS = "apps/v1/deployments"
NODEPOOLS = "karpenter.sh/v1/nodepools"

#: Quick retries instead of kopf's 60 s default, so fault tests converge in well under a second.
FAST = handlers.OperatorConfig(
    retry_backoff_s=0.2,
    api_error_backoffs=(0.05, 0.1, 0.2),
    watch_reconnect_s=0.1,
    watch_server_timeout_s=30,
    workers=4,
)


@contextlib.asynccontextmanager
async def emulator(*, karpenter: bool = True, prometheus: bool = False) -> AsyncIterator[Emulator]:
    """An emulated cluster with the DiffusionService CRD applied (through the API, like kubectl)."""
    async with Emulator() as em, kmock.Server(em):
        crd = yaml.safe_load(CRD_PATH.read_text())
        async with em.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd) as resp:
            assert resp.status == 201, await resp.text()
        async with em.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}) as resp:
            assert resp.status == 201, await resp.text()
        if karpenter:
            em.register(NODEPOOLS, "NodePool", namespaced=False, subresources=("status",))
        if prometheus:
            em.register("monitoring.coreos.com/v1/servicemonitors", "ServiceMonitor", namespaced=True)
        yield em


def url(em: Emulator) -> str:
    return str(em.url).rstrip("/")


@contextlib.asynccontextmanager
async def operator(em: Emulator, config: handlers.OperatorConfig = FAST) -> AsyncIterator[None]:
    """The operator as `stepfleet operator --namespace ml` would run it, stopped cleanly on exit."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url(em), default_namespace=NS)

    clients: list[kube.Client] = []

    def client_factory() -> kube.Client:
        # No keep-alive: an idle pooled connection's server-side handler would look like a hung
        # task to kopf at shutdown (it then waits 5 s before cancelling it).
        clients.append(kube.Client.for_host(url(em), keep_alive=False))
        return clients[-1]

    handlers.register(registry, client_factory, config)
    settings = kopf.OperatorSettings()
    handlers.configure(settings, config)
    settings.queueing.exit_timeout = 1.0
    settings.queueing.idle_timeout = 0.5  # per-object workers end soon after the last event
    settings.watching.connect_timeout = 5
    settings.posting.enabled = False
    # kmock cannot parse `/api/v1/namespaces` (it reads "namespaces" as the namespace prefix);
    # with exact namespace names kopf needs no namespace or CRD scanning anyway.
    settings.scanning.disabled = True
    logging.getLogger("kopf").setLevel(logging.INFO)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(registry=registry, settings=settings, standalone=True, namespaces=[NS], stop_flag=stop, ready_flag=ready)
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield
    finally:
        # Close pooled keep-alive connections first: their server-side handlers would otherwise
        # look like hung tasks to kopf, which then waits 5 s before cancelling them.
        for client in clients:
            client.close()
        stop.set()
        # A graceful exit takes well under a second, except that kopf may respawn a timer for
        # an object whose event was still queued when it stopped the daemons; it would then
        # wait 5 s for that "hung" timer. Cancel such timers (only them) after a grace period.
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:
            for other in asyncio.all_tasks():
                if other.get_name().startswith("runner of ") and "control_loop" in other.get_name():
                    other.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


async def create(em: Emulator, obj: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
    async with em.post(f"/apis/stepfleet.io/v1alpha1/namespaces/{namespace}/diffusionservices", json=obj) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def patch(em: Emulator, name: str, body: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
    headers = {"Content-Type": "application/merge-patch+json"}
    async with em.patch(f"/apis/stepfleet.io/v1alpha1/namespaces/{namespace}/diffusionservices/{name}", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def delete(em: Emulator, name: str, namespace: str = NS) -> None:
    async with em.delete(f"/apis/stepfleet.io/v1alpha1/namespaces/{namespace}/diffusionservices/{name}") as resp:
        assert resp.status == 200, await resp.text()


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None


#: The namespaced kinds a service owns, by their emulator key.
CHILD_KEYS = {
    "ConfigMap": "v1/configmaps",
    "Service": "v1/services",
    "PodDisruptionBudget": "policy/v1/poddisruptionbudgets",
    "Deployment": DEPLOYMENTS,
}

#: What docs/examples/three-pool-fleet.yaml (service `sd15`) reconciles to.
EXPECTED_THREE_POOL = {
    ("ConfigMap", "sd15-router"), ("Service", "sd15-router"), ("Deployment", "sd15-router"),
    *[(k, f"sd15-{p}") for p in ("l4", "inf2", "tpu-v5e") for k in ("Deployment", "Service", "PodDisruptionBudget")],
    ("NodePool", "ml-sd15-l4"), ("NodePool", "ml-sd15-inf2"),
}


def children(em: Emulator, name: str = "sd15") -> dict[tuple[str, str], dict[str, Any]]:
    """Every object service `name` owns, keyed by (kind, name)."""
    out = {}
    for kind, key in CHILD_KEYS.items():
        for obj in em.all(key, NS):
            if obj["metadata"].get("labels", {}).get(names.LABEL_SERVICE) == name:
                out[(kind, obj["metadata"]["name"])] = obj
    for obj in em.all(NODEPOOLS):
        if obj["metadata"]["labels"].get(names.LABEL_OWNER_NAME) == name:
            out[("NodePool", obj["metadata"]["name"])] = obj
    return out


async def reconciled(em: Emulator, name: str = "sd15", generation: int | None = None) -> dict[str, Any]:
    """The service once its status has observed `generation` (default: its current one) and says Ready."""
    def done():
        obj = em.fetch(DFS, NS, name)
        status = (obj or {}).get("status") or {}
        gen = generation or (obj or {}).get("metadata", {}).get("generation")
        return obj if status.get("observedGeneration") == gen and condition(obj, "Ready") else None

    return await eventually(done)
