"""The worker over real HTTP: uvicorn on loopback, the official `openai` client, real parsers."""

import base64
import io
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stepfleet.serving.app import create_app
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.settings import WorkerSettings
from tests.serving.fakes import FakeRunner


@pytest.fixture(scope="module")
def worker(runner, serve_app):
    settings = WorkerSettings(model="tiny-sd", pool="test-pool", max_batch=4, default_steps=4)
    engine = Engine(runner, EngineConfig(max_batch=4))
    app = create_app(settings, engine=engine)
    with serve_app(app) as base:
        yield base


def post(base, body, **kw):
    return httpx.post(f"{base}/v1/images/generations", json=body, timeout=60, **kw)


def test_openai_client_generates_decodable_image_of_requested_size(worker):
    from openai import OpenAI

    client = OpenAI(base_url=f"{worker}/v1", api_key="unused")
    result = client.images.generate(
        model="tiny-sd", prompt="a small red boat", size="128x192", n=2, response_format="b64_json",
        extra_body={"num_inference_steps": 3, "seed": 7, "scheduler": "euler"},
    )
    assert len(result.data) == 2
    for item in result.data:
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert img.format == "PNG" and img.size == (128, 192)


def test_same_seed_same_image_and_formats(worker):
    body = {"prompt": "determinism", "size": "128x128", "num_inference_steps": 3, "seed": 5}
    a = post(worker, body).json()
    b = post(worker, body).json()
    assert a["data"][0]["b64_json"] == b["data"][0]["b64_json"]
    assert a["stepfleet"]["seed"] == 5
    for fmt, pil in (("jpeg", "JPEG"), ("webp", "WEBP")):
        r = post(worker, {**body, "output_format": fmt})
        assert r.status_code == 200 and r.json()["output_format"] == fmt
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).format == pil


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "size": "250x256"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 201}, "num_inference_steps"),
        ({"prompt": "x", "n": 99}, "n"),
        ({"prompt": "x", "scheduler": "plms"}, "scheduler"),
        ({"prompt": "x", "response_format": "url"}, "response_format"),
        ({"prompt": "x", "num_inference_steps": "many"}, "num_inference_steps"),
        ({"prompt": "x", "priority": "urgent"}, "priority"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"size": "256x256"}, "prompt"),
    ],
)
def test_bad_requests_get_400_naming_the_field(worker, body, param):
    r = post(worker, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_is_a_400(worker):
    r = httpx.post(f"{worker}/v1/images/generations", content=b'{"prompt": ', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_unknown_model_is_404_naming_model(worker):
    r = post(worker, {"prompt": "x", "model": "dall-e-3"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_models_health_ready_and_request_id(worker):
    assert httpx.get(f"{worker}/v1/models").json()["data"][0]["id"] == "tiny-sd"
    assert httpx.get(f"{worker}/healthz").status_code == 200
    assert httpx.get(f"{worker}/readyz").json()["status"] == "ready"
    r = post(worker, {"prompt": "id", "size": "64x64", "num_inference_steps": 1}, headers={"X-Request-Id": "abc123"})
    assert r.headers["x-request-id"] == "abc123" and r.json()["stepfleet"]["request_id"] == "abc123"
    assert float(r.headers["x-stepfleet-backlog-seconds"]) >= 0


def test_metrics_parse_and_count_requests(worker):
    post(worker, {"prompt": "metrics", "size": "64x64", "num_inference_steps": 2, "deadline_ms": 60000})
    text = httpx.get(f"{worker}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("stepfleet_queue_depth", "stepfleet_running_batch_size", "stepfleet_step_duration_seconds",
                 "stepfleet_request_duration_seconds", "stepfleet_requests", "stepfleet_images_generated",
                 "stepfleet_slo_requests", "stepfleet_preemptions", "stepfleet_worker_ready"):
        assert name in families, name
    ok = [s for s in families["stepfleet_requests"].samples
          if s.name == "stepfleet_requests_total" and s.labels == {"pool": "test-pool", "kind": "generation", "status": "ok"}]
    assert ok and ok[0].value >= 1
    met = [s for s in families["stepfleet_slo_requests"].samples if s.labels.get("outcome") == "met"]
    assert met and met[0].value >= 1
    invalid = [s for s in families["stepfleet_requests"].samples if s.labels.get("status") == "invalid"]
    assert invalid  # the 400s above were counted
    ready = [s for s in families["stepfleet_worker_ready"].samples][0]
    assert ready.value == 1


@pytest.fixture
def stalled_worker(serve_app):
    fake = FakeRunner()
    engine = Engine(fake, EngineConfig(max_batch=1, max_queue=2))
    app = create_app(WorkerSettings(pool="stall", warmup=False), engine=engine)
    with serve_app(app) as base:
        fake.gate.clear()
        yield base, fake, engine
        fake.gate.set()


def test_queue_full_is_429_with_retry_after(stalled_worker):
    base, fake, engine = stalled_worker
    import concurrent.futures as cf

    body = {"prompt": "q", "num_inference_steps": 5}
    with httpx.Client(timeout=30) as client, cf.ThreadPoolExecutor(8) as pool:
        sent: list[cf.Future] = []
        rejected: list[httpx.Response] = []
        deadline = time.monotonic() + 20
        # The step loop is stalled: keep sending until the worker says its queue is full.
        while not rejected and len(sent) < 8 and time.monotonic() < deadline:
            sent.append(pool.submit(client.post, f"{base}/v1/images/generations", json=body))
            time.sleep(0.1)
            rejected = [f.result() for f in sent if f.done() and f.result().status_code == 429]
        assert rejected, "the worker never answered 429"
        r = rejected[0]
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        fake.gate.set()
        others = [f.result() for f in sent if f.result().status_code != 429]
    # max_queue=2 waiting, plus at most one running behind the stalled step; none lost.
    assert 2 <= len(others) <= 3
    assert all(o.status_code == 200 for o in others)


def test_client_disconnect_frees_the_request(stalled_worker):
    base, fake, engine = stalled_worker
    fake.step_s = 0.05
    fake.gate.set()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/images/generations", json={"prompt": "gone", "num_inference_steps": 200}, timeout=0.5)
    deadline = time.monotonic() + 10
    while engine.load()["running"] + engine.load()["waiting"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load()["running"] + engine.load()["waiting"] == 0
    steps_done = sum(b.count("gone") for b in fake.batches)
    assert 0 < steps_done < 200  # stopped well before its 200 steps (10 s)
