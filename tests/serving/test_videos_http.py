"""The Videos API on a real worker (tiny-wan, loopback): jobs, progress, MP4 content, errors."""

import io
import time

import av
import httpx
import pytest
from PIL import Image

from stepfleet.serving.app import create_app
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.settings import WorkerSettings


@pytest.fixture(scope="module")
def wan_runner():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    return ModelRunner(load_backbone(load_model("tiny-wan", device="cpu")))


@pytest.fixture(scope="module")
def worker(wan_runner, serve_app, tmp_path_factory):
    settings = WorkerSettings(model="tiny-wan", default_steps=2, warmup=False, video_max_jobs=4,
                              video_dir=str(tmp_path_factory.mktemp("videos")))
    with serve_app(create_app(settings, engine=Engine(wan_runner, EngineConfig(max_batch=2)))) as base:
        yield base


def wait_done(client, base, video_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"{base}/v1/videos/{video_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {video_id} did not finish: {job}")


def test_a_job_runs_to_a_playable_mp4(worker):
    with httpx.Client(timeout=30) as client:
        created = client.post(f"{worker}/v1/videos", data={"prompt": "a red cat walks", "num_frames": "9",
                                                           "fps": "8", "seed": "3"})
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["object"] == "video" and job["status"] in ("queued", "in_progress")
        assert job["size"] == "64x64" and job["num_frames"] == 9 and job["model"] == "tiny-wan"
        assert created.headers["openai-poll-after-ms"]
        done = wait_done(client, worker, job["id"])
        assert done["status"] == "completed" and done["progress"] == 100 and done["expires_at"] > done["created_at"]
        content = client.get(f"{worker}/v1/videos/{job['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(content.content)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = list(container.decode(stream))
        assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 64)
        thumb = client.get(f"{worker}/v1/videos/{job['id']}/content", params={"variant": "thumbnail"})
        assert thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).size == (64, 64)
        listed = client.get(f"{worker}/v1/videos").json()
        assert listed["object"] == "list" and job["id"] in [v["id"] for v in listed["data"]]
        assert client.delete(f"{worker}/v1/videos/{job['id']}").json() == {
            "id": job["id"], "object": "video.deleted", "deleted": True}
        assert client.get(f"{worker}/v1/videos/{job['id']}").status_code == 404


@pytest.mark.parametrize(("fields", "param"), [
    ({"seconds": "30"}, "seconds"),
    ({"num_frames": "8"}, "num_frames"),
    ({"num_frames": "401"}, "num_frames"),
    ({"size": "72x72"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"num_inference_steps": "0"}, "num_inference_steps"),
    ({"fps": "abc"}, "fps"),
    ({"bogus": "1"}, "bogus"),
    ({"input_reference": "x"}, "input_reference"),
])
def test_bad_input_is_a_400_naming_the_field(worker, fields, param):
    r = httpx.post(f"{worker}/v1/videos", data={"prompt": "x", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_job_is_404_and_unfinished_content_is_409(worker):
    assert httpx.get(f"{worker}/v1/videos/video_nope").status_code == 404
    assert httpx.get(f"{worker}/v1/videos/video_nope/content").status_code == 404
    assert httpx.delete(f"{worker}/v1/videos/video_nope").status_code == 404
    job = httpx.post(f"{worker}/v1/videos", json={"prompt": "slow", "num_frames": 9, "num_inference_steps": 40,
                                                  "seconds": 1}).json()
    early = httpx.get(f"{worker}/v1/videos/{job['id']}/content")
    assert early.status_code == 409 and early.json()["error"]["code"] == "video_not_ready"
    httpx.delete(f"{worker}/v1/videos/{job['id']}")  # cancels it


def test_a_full_store_is_429_with_retry_after(worker):
    with httpx.Client(timeout=30) as client:
        ids = []
        for _ in range(4):
            r = client.post(f"{worker}/v1/videos", json={"prompt": "fill", "num_frames": 1, "num_inference_steps": 1})
            if r.status_code == 200:
                ids.append(r.json()["id"])
        full = client.post(f"{worker}/v1/videos", json={"prompt": "one more", "num_frames": 1})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "video_store_full"
        for video_id in ids:
            wait_done(client, worker, video_id)
            client.delete(f"{worker}/v1/videos/{video_id}")


def test_a_wan_worker_loaded_by_its_settings_serves_images_and_videos(serve_app, tmp_path):
    """The real load path (model → backbone → extensions → warm-up → calibration), then both APIs."""
    import base64

    settings = WorkerSettings(model="tiny-wan", default_steps=2, video_dir=str(tmp_path))
    with serve_app(create_app(settings)) as base, httpx.Client(timeout=60) as client:
        image = client.post(f"{base}/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
        assert image.status_code == 200, image.text
        png = Image.open(io.BytesIO(base64.b64decode(image.json()["data"][0]["b64_json"])))
        assert png.size == (64, 64)
        streamed = client.post(f"{base}/v1/images/generations", json={"prompt": "a cat", "size": "64x64",
                                                                       "stream": True, "partial_images": 2,
                                                                       "num_inference_steps": 4})
        events = [line for line in streamed.text.splitlines() if line.startswith("event:")]
        assert events == ["event: image_generation.partial_image"] * 2 + ["event: image_generation.completed"]
        job = client.post(f"{base}/v1/videos", json={"prompt": "a cat", "num_frames": 5}).json()
        assert wait_done(client, base, job["id"])["status"] == "completed"


def test_a_model_that_makes_no_videos_answers_501(serve_app):
    from tests.serving.fakes import FakeRunner

    app = create_app(WorkerSettings(warmup=False), engine=Engine(FakeRunner(), EngineConfig()))
    with serve_app(app) as base:
        r = httpx.post(f"{base}/v1/videos", data={"prompt": "x"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "videos_unsupported"
