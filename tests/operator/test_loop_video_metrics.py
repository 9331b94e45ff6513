"""Measuring videos apart from images, on both metric paths (scraped workers, Prometheus)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from loop_helpers import vector
from prometheus_client import generate_latest

from stepfleet.operator.local import fleet
from stepfleet.operator.local.supervise import WorkerView
from stepfleet.operator.loop import observe
from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]


def _finished(kind: RequestKind) -> SimpleNamespace:
    """What `WorkerMetrics.on_finish` reads of an engine request."""
    return SimpleNamespace(kind=kind, params=SimpleNamespace(n=1), arrival=0.0, finished_at=0.5,
                           started_at=0.1, deadline_met=None)


def _worker_text(generations: int, edits: int, videos: int, invalid_videos: int = 0) -> str:
    """A real worker's `/metrics` after serving that many requests of each kind."""
    m = WorkerMetrics(pool="gpu")
    for kind, count in ((RequestKind.GENERATION, generations), (RequestKind.EDIT, edits),
                        (RequestKind.VIDEO, videos)):
        for _ in range(count):
            m.on_finish(_finished(kind), "ok")
    for _ in range(invalid_videos):
        m.on_rejected(RequestKind.VIDEO.value, "invalid")
    m.on_finish(_finished(RequestKind.WARMUP), "ok")  # not a request of any kind
    return generate_latest(m.registry).decode()


# --- scraping ---------------------------------------------------------------------------------------


def test_a_worker_scrape_counts_videos_apart_and_in_the_total():
    sample = observe.parse_worker_metrics(_worker_text(generations=7, edits=2, videos=3, invalid_videos=1))
    assert sample.requests_total == 13
    assert sample.video_requests_total == 4


def test_scraped_rates_split_videos_from_images_across_resets():
    before = {"g-0": observe.parse_worker_metrics(_worker_text(10, 0, 2)),
              "g-1": observe.parse_worker_metrics(_worker_text(50, 5, 8))}
    after = {"g-0": observe.parse_worker_metrics(_worker_text(30, 4, 6)),  # +20 +4 images, +4 videos
             "g-1": observe.parse_worker_metrics(_worker_text(3, 0, 1))}  # restarted: +3 images, +1 video
    m = observe.metrics_from_scrapes(before, after, {"g-0": "gpu", "g-1": "gpu"}, ["gpu", "tpu"], 10.0, 0.9)
    assert m.pools["gpu"].requests_rps == pytest.approx(3.2)
    assert m.pools["gpu"].video_rps == pytest.approx(0.5)
    assert m.pools["gpu"].image_rps == pytest.approx(2.7)
    assert m.video_rps == pytest.approx(0.5) and m.pools["tpu"].video_rps == 0.0


def test_scrapes_without_videos_measure_exactly_as_before():
    before = {"g-0": observe.parse_worker_metrics(_worker_text(10, 1, 0))}
    after = {"g-0": observe.parse_worker_metrics(_worker_text(40, 2, 0))}
    m = observe.metrics_from_scrapes(before, after, {"g-0": "gpu"}, ["gpu"], 10.0, 0.9)
    assert m.pools["gpu"].requests_rps == pytest.approx(3.1) and m.video_rps == 0.0


def test_the_local_fleet_plans_more_workers_for_videos_than_for_as_many_images():
    settings = fleet.LocalSettings(interval_s=2.0, min_workers=0, max_workers=400, throughput_rps_per_worker=2.0)
    spec = fleet.local_policy_spec((fleet.LocalPool("cpu", 0.1),), settings)
    workers = [WorkerView(name="w0", pool="cpu", phase="ready", started_s=0.0, url="http://127.0.0.1:1")]

    def plan_for(videos: int) -> int:
        memory = fleet.LoopMemory()
        first = {"w0": observe.parse_worker_metrics(_worker_text(0, 0, 0))}
        later = {"w0": observe.parse_worker_metrics(_worker_text(20 - videos, 0, videos))}
        assert fleet.control_step(memory, spec, (fleet.LocalPool("cpu", 0.1),), {"cpu": 1}, workers, first,
                                  0.0, 60.0) is None
        plan = fleet.control_step(memory, spec, (fleet.LocalPool("cpu", 0.1),), {"cpu": 1}, workers, later,
                                  2.0, 60.0)
        assert plan is not None
        return plan.replicas["cpu"]

    # 10 rps either way; 2 of them videos at the default 30 images of device time each.
    assert plan_for(4) >= 4 + 2 * 30 // 2
    assert plan_for(4) > 5 * plan_for(0)


# --- Prometheus ---------------------------------------------------------------------------------------


def _answers(requests: dict, videos: dict | None) -> dict:
    out = {"requests": json.loads(vector(requests)), "latency": json.loads(vector({})),
           "queue": json.loads(vector({}))}
    if videos is not None:
        out["videos"] = json.loads(vector(videos))
    return out


def test_prometheus_answers_split_videos_from_the_total():
    m = observe.metrics_from_prometheus(_answers({"a": 4.0, "b": 1.0}, {"a": 0.5}), ["a", "b"], 60)
    assert m.pools["a"].video_rps == pytest.approx(0.5) and m.pools["a"].image_rps == pytest.approx(3.5)
    assert m.pools["b"].video_rps == 0.0 and m.arrival_rps == pytest.approx(5.0)
    # Two queries over one window may disagree by a scrape: never more videos than requests.
    clipped = observe.metrics_from_prometheus(_answers({"a": 0.2}, {"a": 0.3}), ["a"], 60)
    assert clipped.pools["a"].video_rps == pytest.approx(0.2)
    # Answers without the split (a caller that did not ask) count no video.
    assert observe.metrics_from_prometheus(_answers({"a": 1.0}, None), ["a"], 60).video_rps == 0.0


@pytest.mark.parametrize("answer", [
    {"status": "error", "errorType": "bad_data", "error": "parse error"},
    {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {"pool": "a"}, "value": [1, "-1"]}]}},
    None,
])
def test_a_malformed_video_answer_is_refused(answer):
    answers = {**_answers({"a": 1.0}, {}), "videos": answer}
    with pytest.raises(observe.ObservationError, match="videos"):
        observe.metrics_from_prometheus(answers, ["a"], 60)


def _promtool() -> str:
    for candidate in (ROOT / ".tools" / "bin" / "promtool", shutil.which("promtool")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    message = "promtool not found: run scripts/fetch-tools.sh (`make test` does)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)


def test_prometheus_evaluates_the_queries_to_the_split(tmp_path):
    """The real PromQL engine (promtool's rule unit tests) over the workers' own series."""
    queries = observe.prometheus_queries("ml", "tiny", 60, 0.9)

    def series(kind: str, status: str, per_15s: float) -> dict:
        labels = (f'namespace="ml",service="tiny-gpu",pool="gpu",kind="{kind}",status="{status}",'
                  'pod="tiny-gpu-0"')
        return {"series": f"stepfleet_requests_total{{{labels}}}", "values": f"0+{per_15s}x40"}

    (tmp_path / "empty.rules.yaml").write_text("groups: []\n")
    test = {
        "rule_files": ["empty.rules.yaml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                # dyadic rates, so the sum is exact whatever order Prometheus adds them in
                # (promtool compares samples exactly; 1.8 + 0.2 + 0.4 came out 2.4000000000000004)
                series("generation", "ok", 22.5), series("edit", "ok", 7.5),  # 1.5 + 0.5 images/s
                series("video", "ok", 3.75), series("video", "invalid", 0),  # 0.25 videos/s
                # another service's workers are not ours
                {"series": 'stepfleet_requests_total{namespace="ml",service="other-gpu",pool="gpu",'
                           'kind="video",status="ok"}', "values": "0+60x40"},
            ],
            "promql_expr_test": [
                {"expr": queries["requests"], "eval_time": "5m",
                 "exp_samples": [{"labels": '{pool="gpu"}', "value": 2.25}]},
                {"expr": queries["videos"], "eval_time": "5m",
                 "exp_samples": [{"labels": '{pool="gpu"}', "value": 0.25}]},
            ],
        }],
    }
    (tmp_path / "split.test.yaml").write_text(yaml.safe_dump(test))
    proc = subprocess.run([_promtool(), "test", "rules", "split.test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the spec -------------------------------------------------------------------------------------------


def test_video_throughput_per_replica_reaches_the_policy():
    from k8s_helpers import example
    from pydantic import ValidationError

    from stepfleet.operator import crdgen
    from stepfleet.operator.models import DiffusionServiceSpec
    from stepfleet.operator.policy.kinds import DEFAULT_VIDEO_COST_IMAGES

    raw = example("cpu-fleet.yaml")["spec"]
    raw["pools"][0]["videoThroughputPerReplica"] = 0.05
    spec = observe.policy_spec(DiffusionServiceSpec.model_validate(raw))
    assert spec.pools[0].video_throughput_rps_per_replica == 0.05
    assert spec.pools[1].video_throughput_rps_per_replica is None  # derived in the policy
    raw["pools"][0]["videoThroughputPerReplica"] = 0
    with pytest.raises(ValidationError, match="videoThroughputPerReplica|video_throughput_per_replica"):
        DiffusionServiceSpec.model_validate(raw)
    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = schema["properties"]["spec"]["properties"]["pools"]["items"]["properties"]["videoThroughputPerReplica"]
    assert field["minimum"] == 0 and field["exclusiveMinimum"] is True  # OpenAPI v3: > 0
    assert f"throughputPerReplica / {DEFAULT_VIDEO_COST_IMAGES:g}" in field["description"]
