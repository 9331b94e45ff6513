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
from stepfleet.serving.http.generations import generation_params
from stepfleet.serving.http.state import WorkerState
from stepfleet.serving.schemas import ImageGenerationRequest
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
        ({"prompt": "x", "n": 5}, "n"),  # within --max-images, but more than a batch (4) holds
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "priority": [1]}, "priority"),
        ({"prompt": "x", "original_size": "1024"}, "original_size"),
        ({"prompt": "x", "original_size": "0x1024"}, "original_size"),
        ({"prompt": "x", "original_size": 1024}, "original_size"),
        ({"prompt": "x", "target_size": "1024*1024"}, "target_size"),
        ({"prompt": "x", "target_size": "-8x8"}, "target_size"),
        ({"prompt": "x", "target_size": "99999x64"}, "target_size"),  # beyond float16 time ids
        ({"prompt": "x", "crops_coords_top_left": "12"}, "crops_coords_top_left"),
        ({"prompt": "x", "crops_coords_top_left": "1,2,3"}, "crops_coords_top_left"),
        ({"prompt": "x", "crops_coords_top_left": [1]}, "crops_coords_top_left"),
        ({"prompt": "x", "crops_coords_top_left": [-1, 0]}, "crops_coords_top_left"),
        ({"prompt": "x", "crops_coords_top_left": [1.5, 2]}, "crops_coords_top_left"),
        ({"prompt": "x", "crops_coords_top_left": "99999,0"}, "crops_coords_top_left"),
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
    r = httpx.post(f"{worker}/v1/images/generations", content=b'{"prompt": "x"}', timeout=10,
                   headers={"content-type": "application/x-www-form-urlencoded"})  # curl -d without -H
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    assert "application/json" in r.json()["error"]["message"]


def test_micro_conditioning_maps_to_diffusers_height_width_order():
    state = WorkerState.create(WorkerSettings(), max_batch=4)
    body = ImageGenerationRequest(prompt="x", size="64x128", original_size="1024x768", target_size="512x256",
                                  crops_coords_top_left="3,4")
    params = generation_params(body, state)
    assert (params.width, params.height) == (64, 128)
    assert params.original_size == (768, 1024) and params.target_size == (256, 512)
    assert params.crop_top_left == (3, 4)
    listed = ImageGenerationRequest(prompt="x", crops_coords_top_left=[5, 6])
    assert generation_params(listed, state).crop_top_left == (5, 6)
    plain = generation_params(ImageGenerationRequest(prompt="x"), state)
    assert plain.original_size is None and plain.target_size is None and plain.crop_top_left == (0, 0)


def test_families_without_micro_conditioning_ignore_it(worker):
    body = {"prompt": "micro", "size": "64x64", "num_inference_steps": 2, "seed": 3}
    plain = post(worker, body).json()["data"][0]["b64_json"]
    r = post(worker, {**body, "original_size": "1024x1024", "target_size": "512x512",
                      "crops_coords_top_left": [16, 32]})
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["b64_json"] == plain  # SD 1.x has no size/crop conditioning


def test_edits_and_templates_are_501_without_an_edits_extension(worker):
    r = httpx.post(f"{worker}/v1/images/edits", files={"image": ("a.png", b"x", "image/png")},
                   data={"prompt": "x"}, timeout=10)
    assert r.status_code == 501 and r.json()["error"]["code"] == "edits_unsupported"
    assert httpx.get(f"{worker}/v1/templates").status_code == 501


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
    assert post(worker, {"prompt": "metrics", "size": "65x64"}).status_code == 400
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
    assert invalid and invalid[0].value >= 1  # the 400 above was counted
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


def test_a_model_of_another_family_fails_readiness_naming_both(serve_app):
    # The operator reads this /readyz body; the checkpoint's family is checked before weights load.
    app = create_app(WorkerSettings(model="tiny-sd", family="sdxl", warmup=False))
    with serve_app(app, ready_path=None) as base:
        deadline = time.monotonic() + 60
        while (body := httpx.get(f"{base}/readyz").json())["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and body["status"] == "failed"
        assert body["error"].startswith("FamilyMismatch: ") and "sdxl" in body["error"]
        assert httpx.get(f"{base}/healthz").status_code == 200  # alive, for diagnosis
        r = post(base, {"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "FamilyMismatch" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def sdxl_worker(serve_app):
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    runner = ModelRunner(load_backbone(load_model("tiny-sdxl", device="cpu")))
    app = create_app(WorkerSettings(model="tiny-sdxl", warmup=False), engine=Engine(runner, EngineConfig(max_batch=2)))
    with serve_app(app) as base:
        yield base


def test_sdxl_micro_conditioning_reaches_the_model_in_height_width_order(sdxl_worker):
    body = {"prompt": "a lighthouse", "size": "64x128", "num_inference_steps": 2, "seed": 1}

    def image(**extra) -> str:
        r = post(sdxl_worker, {**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    default = image()
    # The defaults are the output size and no crop, so saying them changes nothing; "64x128" is
    # width x height, as `size` is — read as (height, width) it would be another conditioning.
    assert image(original_size="64x128", target_size="64x128", crops_coords_top_left=[0, 0]) == default
    assert image(original_size="128x64") != default
    assert image(target_size="128x64") != default
    assert image(crops_coords_top_left="8,16") != default
