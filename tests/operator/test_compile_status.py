"""A compiled worker's warm-up as the control loop sees it (issue 20).

A worker that is still compiling answers `/readyz` 503 `{"status": "loading", "compile": {...}}`:
that is no failure. One whose compile failed answers `{"status": "failed", "error":
"CompileFailed: ..."}` (or `BucketError: ...`): that must reach the DiffusionService status the
way a `FamilyMismatch` does (`test_loop_observe`, `test_loop_wiring`): Degraded/ModelLoadFailed
with the worker's words, one Warning Event, the pool short at once.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from emulator import eventually
from k8s_helpers import example
from loop_helpers import pod, readyz_body, running_status, serve
from operator_harness import DFS, NS, condition, emulator, operator
from test_loop_wiring import LOOP, _add_pod, _events, _fleet, _replicas, _started, _status, _workers

from stepfleet.operator.loop import act, observe
from stepfleet.operator.models import DiffusionServiceSpec
from stepfleet.operator.policy import PolicyState, decide

NOW = time.time()
COMPILE_FAILED = (
    "CompileFailed: bucket 4 rows x (4, 8, 8) failed to compile with inductor: "
    "torch._dynamo.exc.Unsupported: graph break in UNet2DConditionModel.forward"
)


def _compiling(done: int, total: int) -> str:
    """What a worker says while its warm-up compiles (serving/http/health.py)."""
    return json.dumps({"status": "loading", "error": None,
                       "compile": {"buckets_compiled": done, "buckets_total": total, "seconds": 41.5}})


@pytest.mark.parametrize(
    "body, error",
    [
        (_compiling(1, 4), None),
        (json.dumps({"status": "failed", "error": COMPILE_FAILED,
                     "compile": {"buckets_compiled": 2, "buckets_total": 4, "seconds": 90.0}}), COMPILE_FAILED),
        (readyz_body("failed", "BucketError: bucket size 2048x2048 exceeds --max-image-size 1024"),
         "BucketError: bucket size 2048x2048 exceeds --max-image-size 1024"),
    ],
)
def test_compiling_is_loading_and_a_failed_compile_is_a_failure(body, error):
    assert observe.readyz_failure(503, body) == error


def test_a_failed_compile_degrades_the_service_like_a_family_mismatch():
    raw = example("cpu-fleet.yaml")["spec"]
    raw["serving"] = {**raw.get("serving", {}), "compile": {"enabled": True}}
    spec = DiffusionServiceSpec.model_validate(raw)
    answers = {"tiny-spot-0": (503, readyz_body("failed", COMPILE_FAILED)),
               "tiny-spot-1": (503, _compiling(3, 4))}
    pods = [{**pod("tiny", "spot", i), "status": running_status(ready=False)} for i in (0, 1)]
    failures = observe.load_failures(answers, pods, NOW)
    assert list(failures) == ["spot"] and failures["spot"].pods == ("tiny-spot-0",)
    obs = observe.build_observation(NOW, ["ondemand", "spot"], {}, (0.0, 0.0), observe.Metrics(30), {})
    plan, state = decide(obs, PolicyState(), observe.policy_spec(spec))
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    status = act.decided_status({"conditions": []}, spec, plan, state, demand_rps=0.0, shortages={}, generation=1,
                                now=now, load_failures=failures)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelLoadFailed")
    assert degraded["message"] == f"pool spot: {COMPILE_FAILED}"
    assert status["controlLoop"]["modelLoadFailures"] == {"spot": COMPILE_FAILED}


class _CompilingWorker:
    """A compiled worker's `/readyz`: compiling, then failed (or the test changes `body`)."""

    def __init__(self) -> None:
        self.body = _compiling(1, 4)

    def responder(self, path: str, _: dict[str, list[str]]) -> tuple[int, str, str]:
        if path != "/readyz":
            return 404, "text/plain", "not found"
        return 503, "application/json", self.body


@pytest.mark.timeout(60)
async def test_a_failed_compile_reaches_the_diffusionservice_status():
    worker_readyz = _CompilingWorker()
    fleet = _fleet()
    fleet["spec"]["serving"] = {**fleet["spec"].get("serving", {}), "compile": {"enabled": True}}
    with serve(worker_readyz.responder) as worker:
        async with emulator() as em, operator(em, LOOP):
            await _started(em, fleet)
            async with _workers(em, {"ondemand": 3.0}):
                await eventually(lambda: _replicas(em, "spot") >= 3, timeout=15)
                await _add_pod(em, "spot", 0, running_status(ready=False), port=worker.port)
                asked = len(worker.requests)
                await eventually(lambda: len(worker.requests) >= asked + 2)  # compiling: asked, not failed
                assert condition(em.fetch(DFS, NS, "tiny"), "Degraded")["reason"] != "ModelLoadFailed"
                assert not _events(em, "ModelLoadFailed")
                worker_readyz.body = readyz_body("failed", COMPILE_FAILED)
                degraded = await eventually(
                    lambda: (c := condition(em.fetch(DFS, NS, "tiny"), "Degraded"))
                    and c["reason"] == "ModelLoadFailed" and c
                )
                assert degraded["status"] == "True" and degraded["message"] == f"pool spot: {COMPILE_FAILED}"
                assert _status(em)["controlLoop"]["modelLoadFailures"] == {"spot": COMPILE_FAILED}
                short = condition(em.fetch(DFS, NS, "tiny"), "CapacityShort")
                assert short["status"] == "True" and "spot" in short["message"]
                (warning,) = await eventually(lambda: _events(em, "ModelLoadFailed"))
                assert warning["message"] == f"pool spot: {COMPILE_FAILED} (pods: tiny-spot-0)"
