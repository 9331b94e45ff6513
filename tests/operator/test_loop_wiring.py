"""The control loop wired into the operator, against the emulated API server.

The test plays the cluster: it writes Pods, Deployment status and Karpenter Events, and
serves worker `/metrics` or a Prometheus API from loopback HTTP servers; the operator
(kopf in-process, the loop ticking every 0.2 s) must switch mode, patch replicas, weights
and NodePool limits, and say so in `status` and Events. A Prometheus that fails or talks
garbage, or a worker with malformed metrics, must leave the last plan in place and set
`Degraded`/`ObservationFailed`. A worker whose `/readyz` says its model failed to load
(`family: sdxl` on an SD 1.5 checkpoint) must show as `Degraded`/`ModelLoadFailed` with the
worker's words, one Warning Event, and a pool short of capacity, until it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest
import yaml
from emulator import Fault, eventually
from k8s_helpers import example
from loop_helpers import (
    FAMILY_MISMATCH,
    Readyz,
    Workers,
    ice_event,
    pod,
    running_status,
    serve,
    unready_status,
    unschedulable_status,
    vector,
)
from operator_harness import (
    DEPLOYMENTS,
    DFS,
    FAST,
    NODEPOOLS,
    NS,
    condition,
    create,
    emulator,
    operator,
)

from stepfleet.operator import names

pytestmark = pytest.mark.timeout(60)

LOOP = dataclasses.replace(FAST, loop_tick_s=0.05, loop_http_timeout_s=1.0)
FAST_LOOP = {
    "intervalSeconds": 0.2,
    "dwellSeconds": 0,
    "recoveryWindowSeconds": 0,
    "stabilizationSeconds": 0,
    "pendingGraceSeconds": 60,
    "provisioningSeconds": 0,
    # These tests are about signals and wiring, not hedging (test_loop_hedging.py is).
    "hedgeSpot": 0,
}


def _fleet(**loop: Any) -> dict[str, Any]:
    obj = example("cpu-fleet.yaml")
    obj["spec"]["controlLoop"] = {**FAST_LOOP, **loop}
    return obj


def _status(em) -> dict[str, Any]:
    return (em.fetch(DFS, NS, "tiny") or {}).get("status") or {}


def _replicas(em, pool: str) -> int:
    return em.fetch(DEPLOYMENTS, NS, f"tiny-{pool}")["spec"]["replicas"]


def _weights(em) -> dict[str, float]:
    cm = em.fetch("v1/configmaps", NS, "tiny-router")
    return {p["name"]: p["weight"] for p in yaml.safe_load(cm["data"]["router.yaml"])["pools"]}


def _events(em, reason: str) -> list[dict[str, Any]]:
    return [e for e in em.all("v1/events", NS) if e["reason"] == reason]


async def _post(em, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with em.post(path, json=body) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def _add_pod(em, pool: str, index: int, status: dict[str, Any], port: int = names.WORKER_PORT) -> None:
    await _post(em, f"/api/v1/namespaces/{NS}/pods", pod("tiny", pool, index, port=port))
    await em.set_status("v1/pods", NS, f"tiny-{pool}-{index}", status)


async def _ready(em, pool: str, n: int) -> None:
    await em.set_status(DEPLOYMENTS, NS, f"tiny-{pool}", {"replicas": n, "readyReplicas": n})


async def _started(em, obj: dict[str, Any]) -> None:
    await create(em, obj)
    await eventually(lambda: _status(em).get("observedGeneration") == 1)
    await _ready(em, "ondemand", 1)
    await _ready(em, "router", 1)


@contextlib.asynccontextmanager
async def _workers_served(rates: dict[str, float] | None = None):
    """Worker /metrics servers, one per pool (all pods of a pool scrape one port)."""
    workers = Workers(rates or {"ondemand": 3.0})
    with serve(workers.responder("ondemand")) as ondemand, serve(workers.responder("spot")) as spot:
        yield workers, {"ondemand": ondemand.port, "spot": spot.port}


@contextlib.asynccontextmanager
async def _workers(em, rates: dict[str, float]):
    """...and one ready `ondemand` pod scraping its server."""
    async with _workers_served(rates) as (workers, ports):
        await _add_pod(em, "ondemand", 0, running_status(), port=ports["ondemand"])
        yield workers


async def test_scraped_demand_scales_the_cheapest_pool_and_moves_weights():
    async with emulator() as em, operator(em, LOOP):
        await _started(em, _fleet())
        async with _workers(em, {"ondemand": 3.0}):
            # 3 rps: cost mode puts them on spot (cheapest per image), ondemand stays at its minimum
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
            status = await eventually(lambda: _status(em).get("controlLoop", {}).get("reasons") and _status(em))
            assert status["mode"] == "cost"
            assert any("cost mode" in r for r in status["controlLoop"]["reasons"])
            assert status["controlLoop"]["demandRps"] > 1.0
            # NodePool limits follow the plan (16 cpu a cpu replica): 1 + surge for ondemand
            await eventually(lambda: em.fetch(NODEPOOLS, None, "ml-tiny-ondemand")["spec"]["limits"] == {"cpu": "32"})
            # one run patches the Deployment before the NodePool: read the pair once both landed
            await eventually(lambda: int(em.fetch(NODEPOOLS, None, "ml-tiny-spot")["spec"]["limits"]["cpu"])
                             >= 16 * _replicas(em, "spot"))
            assert _weights(em) == {"ondemand": 1.0, "spot": 0.0}  # spot has nothing ready yet
            # spot's replicas become ready: traffic moves there, and status says so
            n = _replicas(em, "spot")
            await _ready(em, "spot", n)
            await eventually(lambda: _weights(em)["spot"] > 0.5)
            await eventually(lambda: {p["name"]: p["weight"] for p in _status(em)["pools"]} == _weights(em))

            def cost_matches_deployments() -> bool:
                total = 0.357 * _replicas(em, "ondemand") + 0.14 * _replicas(em, "spot")
                return abs(_status(em)["totalCostPerHour"] - total) < 1e-3

            await eventually(cost_matches_deployments)
            assert condition(em.fetch(DFS, NS, "tiny"), "CapacityShort")["status"] == "False"
            # the router's config records the decision that moved the weights (its GET /v1/fleet)
            control = yaml.safe_load(em.fetch("v1/configmaps", NS, "tiny-router")["data"]["router.yaml"])["control"]
            assert control["mode"] == "cost"
            assert control["decisions"][0]["weights"]["spot"] > 0.5 and control["decisions"][0]["reasons"]


async def test_insufficient_capacity_switches_mode_and_back():
    async with emulator() as em, operator(em, LOOP):
        await _started(em, _fleet())
        async with _workers(em, {"ondemand": 3.0}):
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
            # Karpenter cannot launch spot nodes
            event = await _post(em, "/api/v1/namespaces/default/events", ice_event("ml-tiny-spot"))
            await eventually(lambda: _status(em).get("mode") == "capacity")
            switched = await eventually(lambda: _events(em, "ModeChanged"))
            assert "from cost to capacity" in switched[0]["message"] and "spot" in switched[0]["message"]
            obj = em.fetch(DFS, NS, "tiny")
            short = condition(obj, "CapacityShort")
            assert short["status"] == "True" and short["reason"] == "InsufficientCapacity"
            assert {p["name"]: p["capacityState"] for p in obj["status"]["pools"]}["spot"] == "Short"
            assert "spot" in obj["status"]["controlLoop"]["shortSince"]
            await eventually(lambda: _replicas(em, "ondemand") >= 3)  # load spread onto the pool with capacity
            assert _weights(em)["ondemand"] == 1.0  # and no traffic to the short pool
            # capacity returns (dwell and recovery window are 0 here)
            async with em.delete(f"/api/v1/namespaces/default/events/{event['metadata']['name']}") as resp:
                assert resp.status == 200
            await eventually(lambda: _status(em).get("mode") == "cost")
            back = await eventually(lambda: [e for e in _events(em, "ModeChanged") if "from capacity to cost" in e["message"]])
            assert back[0]["type"] == "Normal"
            assert condition(em.fetch(DFS, NS, "tiny"), "CapacityShort")["status"] == "False"


def _cleared(em) -> bool:
    """The loop's own Degraded reason is gone (it clears to `Observing`; a status refresh may
    then report spot's unready replicas as PoolsUnavailable) and so is its last error."""
    degraded = condition(em.fetch(DFS, NS, "tiny"), "Degraded")
    return degraded["reason"] not in ("ObservationFailed", "ActionFailed") and not _status(em)["controlLoop"].get("lastError")


def _prometheus(answers: dict[str, Any]):
    """A Prometheus API answering by which of the loop's queries it is asked."""

    def responder(path: str, query: dict[str, list[str]]) -> tuple[int, str, str]:
        if "failure" in answers:
            return answers["failure"]
        q = query.get("query", [""])[0]
        if 'kind="video"' in q:  # the video jobs among the requests: none unless the test says
            return 200, "application/json", vector(answers.get("videos", {}))
        key = "latency" if q.startswith("histogram_quantile") else "queue" if "queue_depth" in q else "requests"
        return 200, "application/json", vector(answers[key])

    return responder


@pytest.mark.parametrize(
    "spot_pod",
    # Pending/Unschedulable past the 60 s grace; or placed, but its worker crash-loops: no capacity either way.
    [unschedulable_status(300), unready_status(300, "CrashLoopBackOff")],
    ids=["unschedulable", "crash-loop"],
)
async def test_prometheus_demand_and_pods_that_give_no_capacity(spot_pod):
    answers = {"requests": {"ondemand": 3.0}, "latency": {"ondemand": 0.9}, "queue": {"ondemand": 1}}
    with serve(_prometheus(answers)) as prom:
        async with emulator() as em, operator(em, LOOP):
            await _started(em, _fleet(prometheusUrl=prom.url))
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
            assert any('namespace="ml",service=~"tiny-.+"' in q for q in prom.queries())
            await _add_pod(em, "spot", 0, spot_pod)
            await eventually(lambda: _status(em).get("mode") == "capacity")
            short = condition(em.fetch(DFS, NS, "tiny"), "CapacityShort")
            assert short["status"] == "True" and "spot" in short["message"]
            await eventually(lambda: _events(em, "ModeChanged"))


async def test_prometheus_video_demand_is_planned_in_device_time():
    """0.1 of 3 requests/s are videos (30 images of device time each by default): spot goes to
    its maximum and ondemand grows (3 images/s alone plan 6 spot and 1 ondemand)."""
    answers = {"requests": {"ondemand": 3.0}, "videos": {"ondemand": 0.1}, "latency": {}, "queue": {}}
    with serve(_prometheus(answers)) as prom:
        async with emulator() as em, operator(em, LOOP):
            await _started(em, _fleet(prometheusUrl=prom.url))
            await eventually(lambda: _replicas(em, "spot") == 8 and _replicas(em, "ondemand") >= 3, timeout=15)
            assert any('kind="video"' in q for q in prom.queries())
            reasons = _status(em)["controlLoop"]["reasons"]
            assert any("0.100 videos/s (3.3% videos)" in r for r in reasons), reasons


@pytest.mark.parametrize(
    "failure, words",
    [
        ((500, "text/plain", "internal error"), "500"),
        ((200, "text/html", "<html>not an API</html>"), "non-JSON"),
        ((200, "application/json", '{"status": "success", "data": {"resultType": "vector", "result": [{"value": 3}]}}'),
         "malformed"),
    ],
    ids=["http-500", "not-json", "malformed-sample"],
)
async def test_prometheus_failure_keeps_the_last_plan_and_says_why(failure, words):
    answers: dict[str, Any] = {"requests": {"ondemand": 3.0}, "latency": {}, "queue": {}}
    with serve(_prometheus(answers)) as prom:
        async with emulator() as em, operator(em, LOOP):
            await _started(em, _fleet(prometheusUrl=prom.url))
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
            answers["failure"] = failure
            answers["requests"] = {}  # were it read, no demand would scale spot down (no stabilization here)
            degraded = await eventually(
                lambda: (c := condition(em.fetch(DFS, NS, "tiny"), "Degraded")) and c["reason"] == "ObservationFailed" and c
            )
            # runs are sequential: the one that failed came after every run that acted
            planned = (_replicas(em, "ondemand"), _replicas(em, "spot"), _weights(em))
            assert degraded["status"] == "True" and words in degraded["message"]
            assert words in _status(em)["controlLoop"]["lastError"]
            warnings = await eventually(lambda: _events(em, "ObservationFailed"))
            assert warnings[0]["type"] == "Warning"
            ticks = len(prom.requests)
            await eventually(lambda: len(prom.requests) >= ticks + 3)  # the loop keeps running...
            assert (_replicas(em, "ondemand"), _replicas(em, "spot"), _weights(em)) == planned  # ...on its last plan
            assert len(_events(em, "ObservationFailed")) == 1  # one Warning per episode, not per tick
            # Prometheus is back: the loop decides again and clears its condition
            answers.pop("failure")
            await eventually(lambda: _cleared(em))
            await eventually(lambda: _replicas(em, "spot") < planned[1])


async def test_malformed_worker_metrics_degrade_without_acting():
    async with emulator() as em, operator(em, LOOP):
        await _started(em, _fleet())
        async with _workers(em, {"ondemand": 3.0}) as workers:
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
            workers.garbage = 'stepfleet_queue_depth{pool="ondemand"} lots\n'
            degraded = await eventually(
                lambda: (c := condition(em.fetch(DFS, NS, "tiny"), "Degraded")) and c["reason"] == "ObservationFailed" and c
            )
            assert "malformed worker metrics" in degraded["message"]
            before = _replicas(em, "spot")
            await asyncio.sleep(0.5)
            assert _replicas(em, "spot") == before


async def test_forced_mode_is_obeyed_and_announced():
    async with emulator() as em, operator(em, LOOP):
        obj = _fleet()
        obj["spec"]["mode"] = "capacity"
        await _started(em, obj)
        async with _workers(em, {"ondemand": 1.0}):
            await eventually(lambda: _status(em).get("mode") == "capacity" and _status(em).get("controlLoop"))
            event = await eventually(lambda: _events(em, "ModeChanged"))
            assert "forced to capacity" in event[0]["message"]


async def test_mode_and_shortage_survive_an_operator_restart():
    async with emulator() as em, _workers_served() as (workers, ports):
        async with operator(em, LOOP):
            await _started(em, _fleet(dwellSeconds=3600))
            await _add_pod(em, "ondemand", 0, running_status(), port=ports["ondemand"])
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
            event = await _post(em, "/api/v1/namespaces/default/events", ice_event("ml-tiny-spot"))
            await eventually(lambda: _status(em).get("mode") == "capacity")
        async with em.delete(f"/api/v1/namespaces/default/events/{event['metadata']['name']}") as resp:
            assert resp.status == 200

        def recovered_but_dwelling() -> bool:
            reasons = _status(em)["controlLoop"]["reasons"]
            return not any("still short" in r for r in reasons) and any("dwell" in r for r in reasons)

        async with operator(em, LOOP):
            # a fresh loop would start in cost mode; this one remembers the switch and its dwell
            await eventually(recovered_but_dwelling, timeout=15)
            assert _status(em)["mode"] == "capacity"
            assert len(_events(em, "ModeChanged")) == 1


async def test_a_failed_write_is_reported_and_retried():
    async with emulator() as em, operator(em, LOOP):
        await _started(em, _fleet())
        fault = Fault(method="PATCH", path=r"/deployments/tiny-spot$", status=500, times=10_000)
        em.faults.append(fault)
        async with _workers(em, {"ondemand": 3.0}):
            degraded = await eventually(
                lambda: (c := condition(em.fetch(DFS, NS, "tiny"), "Degraded")) and c["reason"] == "ActionFailed" and c,
                timeout=15,
            )
            assert degraded["status"] == "True" and "500" in degraded["message"]
            assert _replicas(em, "spot") == 0
            em.faults.remove(fault)
            await eventually(lambda: _replicas(em, "spot") >= 3)
            await eventually(lambda: _cleared(em))


async def test_a_worker_that_cannot_load_the_model_is_reported_once_and_cleared():
    readyz = Readyz("failed", FAMILY_MISMATCH)
    with serve(readyz.responder) as worker:
        async with emulator() as em, operator(em, LOOP):
            await _started(em, _fleet())
            async with _workers(em, {"ondemand": 3.0}):
                await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
                # a spot worker runs, but its /readyz says the checkpoint is of another family
                await _add_pod(em, "spot", 0, running_status(ready=False), port=worker.port)
                degraded = await eventually(
                    lambda: (c := condition(em.fetch(DFS, NS, "tiny"), "Degraded"))
                    and c["reason"] == "ModelLoadFailed" and c
                )
                assert degraded["status"] == "True" and degraded["message"] == f"pool spot: {FAMILY_MISMATCH}"
                assert _status(em)["controlLoop"]["modelLoadFailures"] == {"spot": FAMILY_MISMATCH}
                # short at once (the readiness timeout is 900 s): the load spreads onto ondemand
                short = condition(em.fetch(DFS, NS, "tiny"), "CapacityShort")
                assert short["status"] == "True" and "spot" in short["message"]
                await eventually(lambda: _status(em).get("mode") == "capacity")
                (warning,) = await eventually(lambda: _events(em, "ModelLoadFailed"))
                assert warning["type"] == "Warning"
                assert warning["message"] == f"pool spot: {FAMILY_MISMATCH} (pods: tiny-spot-0)"
                asked = len(worker.requests)
                await eventually(lambda: len(worker.requests) >= asked + 3)  # ticks go on...
                assert len(_events(em, "ModelLoadFailed")) == 1  # ...without repeating the Warning
                # the spec is fixed and the new worker loads: the condition and the record clear
                readyz.status, readyz.error = "loading", None
                await eventually(
                    lambda: condition(em.fetch(DFS, NS, "tiny"), "Degraded")["reason"] != "ModelLoadFailed"
                )
                assert not _status(em)["controlLoop"].get("modelLoadFailures")
                await eventually(lambda: _status(em).get("mode") == "cost")
                assert len(_events(em, "ModelLoadFailed")) == 1
