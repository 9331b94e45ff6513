"""The official `openai` client's Videos API through the router in front of two tiny-wan workers,
and a worker restart that marks its unfinished jobs failed."""

import io
from contextlib import ExitStack

import av
import httpx
import pytest

from stepfleet.serving.app import create_app as create_worker
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.router.app import create_app as create_router
from stepfleet.serving.router.config import RouterSettings, parse_config
from stepfleet.serving.settings import WorkerSettings
from stepfleet.serving.videos.jobs import JobStatus, JobStore, VideoJob


@pytest.fixture(scope="module")
def wan_runner():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    return ModelRunner(load_backbone(load_model("tiny-wan", device="cpu")))


@pytest.fixture(scope="module")
def routed(wan_runner, serve_app, tmp_path_factory):
    with ExitStack() as stack:
        urls = []
        for pool in ("cpu-a", "cpu-b"):
            settings = WorkerSettings(model="tiny-wan", pool=pool, default_steps=2, warmup=False,
                                      video_dir=str(tmp_path_factory.mktemp(pool)))
            engine = Engine(wan_runner, EngineConfig(max_batch=2))
            urls.append(stack.enter_context(serve_app(create_worker(settings, engine=engine))))
        config = parse_config(
            "version: 1\nservice: test\nmodel: tiny-wan\npools:\n"
            f"- {{name: cpu-a, endpoints: [{urls[0]}], weight: 0.5}}\n"
            f"- {{name: cpu-b, endpoints: [{urls[1]}], weight: 0.5}}\n")
        yield stack.enter_context(serve_app(create_router(config, RouterSettings(default_steps=2)))), urls


def test_openai_client_create_and_poll_and_download(routed):
    from openai import OpenAI

    base, urls = routed
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    made = []
    for seed in (1, 2):  # equal weights: one job on each worker
        video = client.videos.create_and_poll(prompt="a small red boat", model="tiny-wan", size="64x64",
                                              extra_body={"num_frames": 5, "fps": 8, "seed": seed},
                                              poll_interval_ms=100)
        assert video.status == "completed" and video.progress == 100, video
        content = client.videos.download_content(video.id)
        with av.open(io.BytesIO(content.read())) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 5 and (frames[0].width, frames[0].height) == (64, 64)
        thumb = client.videos.download_content(video.id, variant="thumbnail").read()
        assert thumb.startswith(b"\x89PNG")
        made.append(video.id)
    # Each job lives on one worker only: the router pinned the follow-ups there.
    homes = [sum(httpx.get(f"{u}/v1/videos/{vid}").status_code == 200 for u in urls) for vid in made]
    assert homes == [1, 1]
    assert {v.id for v in client.videos.list()} >= set(made)
    assert client.videos.delete(made[0]).deleted
    import openai

    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(made[0])
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", seconds="12", extra_body={"fps": 60})
    assert info.value.body["param"] == "seconds"


def test_a_restart_marks_unfinished_jobs_failed(tmp_path):
    store = JobStore(directory=tmp_path, clock=lambda: 1000.0)
    for i, status in enumerate((JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.COMPLETED)):
        job = VideoJob(id=f"video_{i}", created_at=1000 + i, model="m", prompt="p", seconds="1", size="64x64",
                       num_frames=9, fps=8, status=status)
        store.add(job)
        if status is JobStatus.COMPLETED:
            store.finish(job, JobStatus.COMPLETED)
    reborn = JobStore(directory=tmp_path, clock=lambda: 1001.0)
    states = {i: reborn.get(f"video_{i}") for i in range(3)}
    assert states[0].status is states[1].status is JobStatus.FAILED
    assert states[0].error["code"] == "worker_restarted" and "restarted" in states[1].error["message"]
    assert states[2].status is JobStatus.COMPLETED
    gone = JobStore(directory=tmp_path, clock=lambda: 1001.0 + 3600.0)
    assert len(gone) == 0  # finished jobs expire ttl_s after they finished


def test_the_router_prices_a_video_by_its_latent_frames():
    from stepfleet.serving.router.videos import video_cost

    image_like = video_cost({"num_frames": "1", "size": "64x64"}, 20, 512).units
    assert video_cost({"num_frames": "81", "size": "64x64"}, 20, 512).units == 21 * image_like
    assert video_cost({"seconds": "4", "fps": "16", "size": "64x64"}, 20, 512).units == 16 * image_like  # 64 frames
    assert video_cost({"num_frames": "bogus"}, 20, 512).units > 0  # the worker refuses it; priced at defaults
