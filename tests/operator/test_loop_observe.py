"""The control loop's pure parts: metrics, capacity signals, the observation, status and state."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from k8s_helpers import example
from loop_helpers import (
    FAMILY_MISMATCH,
    Workers,
    ice_event,
    pod,
    readyz_body,
    running_status,
    unready_status,
    unschedulable_status,
    vector,
)

from stepfleet.operator import conditions
from stepfleet.operator.loop import act, observe
from stepfleet.operator.models import DiffusionServiceSpec
from stepfleet.operator.policy import PolicyState, decide
from stepfleet.serving import metrics as wm

NOW = time.time()


def _spec(**loop) -> DiffusionServiceSpec:
    raw = example("cpu-fleet.yaml")["spec"]
    raw["controlLoop"] = {"intervalSeconds": 30, **loop}
    return DiffusionServiceSpec.model_validate(raw)


# --- worker metrics -----------------------------------------------------------------------------


def test_worker_metrics_are_parsed_and_summed_over_kinds():
    text = Workers({"spot": 2.0}, queue=3).text("spot")
    sample = observe.parse_worker_metrics(text + f'{wm.REQUESTS}{{pool="spot",kind="edit",status="ok"}} 5\n')
    assert sample.queue_depth == 3
    assert sample.requests_total > 5
    assert [le for le, _ in sample.latency_buckets] == [1.0, float("inf")]


@pytest.mark.parametrize(
    "text",
    [
        "this is not the Prometheus text format",
        f'{wm.QUEUE_DEPTH}{{pool="a"}} many\n',
        f'{wm.REQUESTS}{{pool="a"}} -4\n',
        "other_metric 1\n",  # nothing the loop needs
    ],
)
def test_malformed_worker_metrics_are_refused(text):
    with pytest.raises(observe.ObservationError):
        observe.parse_worker_metrics(text)


def _sample(requests: float, under_1s: float, queue: float = 0.0) -> observe.WorkerSample:
    return observe.WorkerSample(requests, ((1.0, under_1s), (float("inf"), requests)), queue)


def test_rates_between_scrapes_handle_resets_and_new_pods():
    before = {"a-0": _sample(100, 90), "a-1": _sample(50, 50)}
    after = {"a-0": _sample(130, 120, queue=2), "a-1": _sample(10, 10), "a-2": _sample(400, 400, queue=1)}
    pools = {"a-0": "a", "a-1": "a", "a-2": "a"}
    m = observe.metrics_from_scrapes(before, after, pools, ["a", "b"], 10.0, 0.9)
    # a-0: +30; a-1 restarted: +10; a-2 seen once: nothing yet
    assert m.pools["a"].requests_rps == pytest.approx(4.0)
    assert m.pools["a"].queue_depth == 3
    assert m.pools["b"].requests_rps == 0 and m.pools["b"].latency_s is None
    assert m.arrival_rps == pytest.approx(4.0)
    # 40 requests in the window, all under 1 s: the 0.9 quantile interpolates to 0.9 s
    assert m.pools["a"].latency_s == pytest.approx(0.9)


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.5, 50.0), (1.0, 90.0), (float("inf"), 100.0)]
    assert observe.histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert observe.histogram_quantile(0.7, buckets) == pytest.approx(0.75)
    assert observe.histogram_quantile(0.95, buckets) == 1.0  # top bucket: the highest finite bound
    assert observe.histogram_quantile(0.9, []) is None


# --- Prometheus answers ---------------------------------------------------------------------------


def test_prometheus_answers_become_metrics():
    answers = {
        "requests": json.loads(vector({"ondemand": 1.5, "spot": 2.5})),
        "latency": json.loads(vector({"ondemand": 0.8, "spot": "NaN"})),
        "queue": json.loads(vector({"spot": 4})),
    }
    m = observe.metrics_from_prometheus(answers, ["ondemand", "spot"], 60)
    assert m.arrival_rps == pytest.approx(4.0)
    assert m.pools["ondemand"].latency_s == pytest.approx(0.8)
    assert m.pools["spot"].latency_s is None and m.pools["spot"].queue_depth == 4


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "error", "errorType": "bad_data", "error": "parse error"},
        {"status": "success", "data": {"resultType": "matrix", "result": []}},
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": ["x"]}]}},
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {"pool": "a"}, "value": [1, "-1"]}]}},
        "garbage",
    ],
)
def test_malformed_prometheus_answers_are_refused(answer):
    answers = {"requests": answer, "latency": json.loads(vector({})), "queue": json.loads(vector({}))}
    with pytest.raises(observe.ObservationError):
        observe.metrics_from_prometheus(answers, ["a"], 60)


def test_prometheus_queries_select_the_service_workers():
    queries = observe.prometheus_queries("ml", "tiny", 60, 0.9)
    assert set(queries) == {"requests", "videos", "latency", "queue"}
    assert all('namespace="ml",service=~"tiny-.+"' in q for q in queries.values())
    assert "histogram_quantile(0.9," in queries["latency"] and "[60s]" in queries["requests"]


# --- capacity -------------------------------------------------------------------------------------


def test_insufficient_capacity_events_map_to_pools():
    nodepools = {"spot": "ml-tiny-spot", "ondemand": "ml-tiny-ondemand"}
    events = [
        ice_event("ml-tiny-spot", first_ago=120, last_ago=5),
        ice_event("ml-tiny-ondemand", first_ago=4000, last_ago=3600),  # long over
        {**ice_event("ml-other-spot"), "reason": "InsufficientCapacityError"},  # not ours
        {**ice_event("ml-tiny-ondemand"), "reason": "Launched"},
    ]
    short = observe.shortages_from_events(events, [], nodepools, time.time(), 180)
    assert list(short) == ["spot"]
    assert short["spot"] == pytest.approx(time.time() - 120, abs=2)


def test_a_nodeclaim_label_wins_over_its_name():
    claims = [{"metadata": {"name": "ml-tiny-spot-x7k2p", "labels": {"karpenter.sh/nodepool": "ml-tiny-ondemand"}}}]
    short = observe.shortages_from_events(
        [ice_event("ml-tiny-spot")], claims, {"spot": "ml-tiny-spot", "ondemand": "ml-tiny-ondemand"}, time.time(), 180
    )
    assert list(short) == ["ondemand"]


def test_unschedulable_pods_count_only_past_the_grace_period():
    pods = [
        {**pod("tiny", "spot", 0), "status": unschedulable_status(300)},
        {**pod("tiny", "ondemand", 0), "status": unschedulable_status(10)},
        {**pod("tiny", "ondemand", 1), "status": running_status()},
    ]
    short = observe.shortages_from_pods(pods, time.time(), 180)
    assert list(short) == ["spot"] and short["spot"] == pytest.approx(time.time() - 300, abs=2)


def test_scrape_url_uses_the_http_port_of_ready_pods_only():
    ready = {**pod("tiny", "spot", 0, port=18001), "status": running_status()}
    assert observe.scrape_url(ready) == "http://127.0.0.1:18001/metrics"
    assert observe.scrape_url({**ready, "status": running_status(ready=False)}) is None


# --- spec, observation, status --------------------------------------------------------------------


def test_policy_spec_carries_the_loop_settings():
    spec = _spec(dwellSeconds=5, recoveryWindowSeconds=7, stabilizationSeconds=9, provisioningSeconds=11)
    ps = observe.policy_spec(spec)
    assert ps.slo.percentile == pytest.approx(0.9) and ps.slo.latency_s == 2
    assert (ps.control.interval_s, ps.control.dwell_s, ps.control.recovery_window_s, ps.control.stabilization_s) == (
        30, 5, 7, 9,
    )
    spot = ps.pool("spot")
    assert (spot.min_replicas, spot.max_replicas, spot.provision_s) == (0, 8, 11)
    assert spot.throughput_rps_per_replica == observe.DEFAULT_THROUGHPUT_RPS


def test_observation_decision_and_status_round_trip():
    spec = _spec()
    deployments = {
        "ondemand": {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}},
        "spot": {"spec": {"replicas": 0}},
    }
    metrics = observe.Metrics(30, {"ondemand": observe.PoolMetrics(3.0, 1.2, 2)})
    obs = observe.build_observation(NOW, ["ondemand", "spot"], deployments, (3.0, 0.0), metrics, {"spot": NOW - 60})
    assert obs.pool("spot").capacity_short_since == NOW - 60
    assert obs.pool("ondemand").queue_depth == 2
    plan, state = decide(obs, PolicyState(), observe.policy_spec(spec))
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    old = {"pools": [{"name": "ondemand", "readyReplicas": 1}], "conditions": []}
    status = act.decided_status(old, spec, plan, state, demand_rps=3.0, shortages={"spot": NOW - 60},
                                generation=1, now=now)
    assert status["mode"] == plan.mode == "capacity"
    assert [p["capacityState"] for p in status["pools"]] == ["Available", "Short"]
    assert status["pools"][0]["readyReplicas"] == 1
    assert sum(p["weight"] for p in status["pools"]) == pytest.approx(1.0)
    assert status["controlLoop"]["reasons"] and status["controlLoop"]["shortSince"] == {
        "spot": observe.format_time(NOW - 60)
    }
    short = next(c for c in status["conditions"] if c["type"] == "CapacityShort")
    assert short["status"] == "True" and short["reason"] == "InsufficientCapacity" and "spot" in short["message"]
    # what a restarted operator reads back
    restored = act.state_from_status(status)
    assert restored.mode == "capacity"
    assert restored.mode_since_s == pytest.approx(state.mode_since_s, abs=1)
    assert restored.memory("spot").short_since == pytest.approx(NOW - 60, abs=1)


def test_failure_keeps_a_graver_degraded_and_clears_only_its_own():
    now = dt.datetime.now(dt.timezone.utc)
    conflict = {"conditions": [{"type": "Degraded", "status": "True", "reason": "ChildConflict", "message": "x"}]}
    unavailable = {"conditions": [{"type": "Degraded", "status": "True", "reason": "PoolsUnavailable", "message": "x"}]}
    outranked = act.failed_status(unavailable, "ObservationFailed", "boom", generation=1, now=now)
    assert outranked["conditions"][0]["reason"] == "ObservationFailed"
    kept = act.failed_status(conflict, "ObservationFailed", "boom", generation=1, now=now)
    assert kept["conditions"][0]["reason"] == "ChildConflict" and kept["controlLoop"]["lastError"] == "boom"
    failed = act.failed_status({"conditions": []}, "ObservationFailed", "boom", generation=1, now=now)
    assert failed["conditions"][0]["reason"] == "ObservationFailed"
    assert act.newly_degraded({"conditions": []}, failed, "ObservationFailed")
    assert not act.newly_degraded(failed, failed, "ObservationFailed")
    cleared = act.clear_loop_degraded(failed["conditions"], generation=1, now=now)
    assert cleared[0]["status"] == "False" and cleared[0]["reason"] == "Observing"
    assert act.clear_loop_degraded(conflict["conditions"], generation=1, now=now)[0]["reason"] == "ChildConflict"


def test_nodepool_limits_follow_the_plan_unless_the_spec_sets_them():
    spec = _spec()
    spot = spec.pools[1]
    assert act.nodepool_limits(spot, 3) == {"cpu": "48"}
    pinned = spot.model_copy(update={"node_pool": spot.node_pool.model_copy(update={"limits": {"cpu": "64"}})})
    assert act.nodepool_limits(pinned, 3) == {"cpu": "64"}


def test_crash_loops_count_after_the_grace_and_silent_unready_pods_after_the_readiness_timeout():
    now = time.time()
    pods = [
        {**pod("tiny", "spot", 0), "status": unready_status(200, "CrashLoopBackOff")},  # stuck, past grace
        {**pod("tiny", "ondemand", 0), "status": unready_status(60, "ImagePullBackOff")},  # stuck, in grace
        {**pod("tiny", "cpu", 0), "status": unready_status(1000)},  # model never loaded, past timeout
        {**pod("tiny", "tpu", 0), "status": unready_status(300)},  # still loading, within timeout
        {**pod("tiny", "gpu", 0), "status": running_status()},  # ready
        {**pod("tiny", "gpu", 1), "status": unschedulable_status(1000)},  # not placed: the other signal's
    ]
    short = observe.shortages_from_unready_pods(pods, now, stuck_grace_s=180, readiness_timeout_s=900)
    assert sorted(short) == ["cpu", "spot"]
    assert short["spot"] == pytest.approx(now - 200, abs=2)
    off = observe.shortages_from_unready_pods(pods, now, stuck_grace_s=180, readiness_timeout_s=0)
    assert sorted(off) == ["spot"]


# --- model loads (a worker's /readyz) ---------------------------------------------------------


def test_readyz_is_asked_of_running_unready_pods_only():
    unready = {**pod("tiny", "spot", 0, port=18001), "status": running_status(ready=False)}
    assert observe.readyz_url(unready) == "http://127.0.0.1:18001/readyz"
    assert observe.readyz_url({**unready, "status": running_status()}) is None  # ready: nothing to ask
    assert observe.readyz_url({**unready, "status": unschedulable_status(10)}) is None  # not running
    assert observe.readyz_url({**unready, "status": unready_status(10)}) is None  # no pod IP yet
    v6 = {**unready, "status": {**running_status(ready=False), "podIP": "fd00::7"}}
    assert observe.readyz_url(v6) == "http://[fd00::7]:18001/readyz"


@pytest.mark.parametrize(
    "code, body, error",
    [
        (503, readyz_body("failed", FAMILY_MISMATCH), FAMILY_MISMATCH),
        (503, readyz_body("failed", None), "model load failed (HTTP 503, no reason given)"),
        (503, readyz_body("failed", "  "), "model load failed (HTTP 503, no reason given)"),
        (503, readyz_body("loading"), None),
        (200, json.dumps({"status": "ready", "model": "tiny-sd"}), None),
        (502, "<html>bad gateway</html>", None),  # not the worker speaking
        (503, "[1, 2]", None),
        (503, "", None),
    ],
)
def test_a_readyz_answer_is_a_failure_only_when_the_worker_says_so(code, body, error):
    assert observe.readyz_failure(code, body) == error


def test_long_worker_errors_are_cut():
    error = observe.readyz_failure(503, readyz_body("failed", "x" * 5000))
    assert len(error) == observe.MAX_LOAD_ERROR_CHARS and error.endswith("…")


def test_failed_loads_are_gathered_per_pool():
    now = time.time()
    failed_since = {**unready_status(120), "phase": "Running", "podIP": "10.0.0.9"}
    pods = [
        {**pod("tiny", "spot", 0), "status": running_status(ready=False)},
        {**pod("tiny", "spot", 1), "status": failed_since},
        {**pod("tiny", "spot", 2), "status": running_status(ready=False)},
        {**pod("tiny", "ondemand", 0), "status": running_status(ready=False)},
        {**pod("tiny", "ondemand", 1), "status": running_status(ready=False)},
        {**pod("other", "gpu", 0), "status": running_status(ready=False)},
    ]
    answers = {
        "tiny-spot-0": (503, readyz_body("failed", FAMILY_MISMATCH)),
        "tiny-spot-1": (503, readyz_body("failed", FAMILY_MISMATCH)),
        "tiny-spot-2": (503, readyz_body("failed", "OSError: no file named model_index.json")),
        "tiny-ondemand-0": (503, readyz_body("loading")),
        "tiny-ondemand-1": None,  # not listening yet
    }
    failures = observe.load_failures(answers, pods, now)
    assert list(failures) == ["spot"]
    spot = failures["spot"]
    assert spot.pods == ("tiny-spot-0", "tiny-spot-1", "tiny-spot-2")
    assert spot.errors == (FAMILY_MISMATCH, "OSError: no file named model_index.json")
    assert spot.message == "; ".join(spot.errors)
    assert spot.since_s == pytest.approx(now - 120, abs=2)  # the longest un-ready of them
    assert observe.load_failures({}, pods, now) == {}


def _decided(old, failures, *, shortages=None):
    spec = _spec()
    obs = observe.build_observation(NOW, ["ondemand", "spot"], {}, (0.0, 0.0), observe.Metrics(30), {})
    plan, state = decide(obs, PolicyState(), observe.policy_spec(spec))
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    return act.decided_status(old, spec, plan, state, demand_rps=0.0, shortages=shortages or {}, generation=1,
                              now=now, load_failures=failures)


def test_a_failed_load_degrades_the_service_until_it_is_gone():
    failure = observe.LoadFailure(pool="spot", errors=(FAMILY_MISMATCH,), pods=("tiny-spot-0",), since_s=NOW - 30)
    meta = {"name": "tiny", "namespace": "ml", "uid": "u"}
    now = dt.datetime.fromtimestamp(NOW, dt.timezone.utc)
    failing = _decided({"conditions": []}, {"spot": failure})
    degraded = next(c for c in failing["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelLoadFailed")
    assert degraded["message"] == f"pool spot: {FAMILY_MISMATCH}"
    assert failing["controlLoop"]["modelLoadFailures"] == {"spot": FAMILY_MISMATCH}
    # one Warning when the failure appears, none while it says the same, one when it says something new
    (event,) = act.load_failure_events(meta, {"conditions": []}, {"spot": failure}, now)
    assert (event["type"], event["reason"]) == ("Warning", "ModelLoadFailed")
    assert event["message"] == f"pool spot: {FAMILY_MISMATCH} (pods: tiny-spot-0)"
    assert act.load_failure_events(meta, failing, {"spot": failure}, now) == []
    again = _decided(failing, {"spot": failure})
    assert next(c for c in again["conditions"] if c["type"] == "Degraded") == degraded  # no new transition
    other = observe.LoadFailure(pool="spot", errors=("OSError: gone",), pods=("tiny-spot-0",), since_s=NOW)
    assert len(act.load_failure_events(meta, failing, {"spot": other}, now)) == 1
    # the reconcile's status refresh keeps the loop's finding; only the loop clears it
    assert "ModelLoadFailed" in conditions.LOOP_DEGRADED_REASONS
    healed = _decided(failing, {})
    cleared = next(c for c in healed["conditions"] if c["type"] == "Degraded")
    assert (cleared["status"], cleared["reason"]) == ("False", "Observing")
    assert healed["controlLoop"]["modelLoadFailures"] == {"spot": None}  # a merge patch removes it
    # a child that cannot exist outranks it
    conflict = {"conditions": [{"type": "Degraded", "status": "True", "reason": "ChildConflict", "message": "x"}]}
    kept = _decided(conflict, {"spot": failure})
    assert next(c for c in kept["conditions"] if c["type"] == "Degraded")["reason"] == "ChildConflict"
