"""A video job's device time in the worker's reported backlog, from the moment it is accepted.

The router forgets a video create once its POST answers (a fast call), so what keeps a busy
worker from getting every video of a burst is the backlog the worker reports on that answer
(`X-Stepfleet-Backlog-Seconds`) and on each `/v1/load` poll. It must count the video's frames
before the worker has ever run a step of that shape, and while the job is still being prepared.
"""

import pytest

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.params import GenerationParams

IMAGE = (16, 1, 8, 8)  # Wan's one-frame latents at 64x64


def test_an_unseen_video_shape_is_priced_by_its_frames():
    m = StepCostModel()
    m.calibrate(IMAGE, {1: 0.1, 2: 0.18})
    assert m.step_seconds((16, 9, 8, 8), 2) == pytest.approx(9 * 0.18)
    assert m.step_seconds((4, 16, 16), 1) == pytest.approx(0.1 * 4)  # images: by h x w, as before


@pytest.fixture(scope="module")
def wan_runner():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    return ModelRunner(load_backbone(load_model("tiny-wan", device="cpu")))


def test_a_queued_video_counts_its_frames_in_the_backlog(wan_runner):
    # Not started: on a CPU the prompt is encoded on the loop thread, so requests stay queued.
    engine = Engine(wan_runner, EngineConfig(max_batch=2))
    engine.cost.calibrate(wan_runner.latent_shape(64, 64), {1: 0.1, 2: 0.18})
    try:
        def params(frames: int | None) -> GenerationParams:
            return GenerationParams(prompt="a boat", width=64, height=64, num_inference_steps=4,
                                    guidance_scale=1.0, num_frames=frames)

        engine.submit(params(None))
        image_s = engine.load()["backlog_s"]
        engine.submit(params(33), kind=RequestKind.VIDEO)  # 33 frames: 9 latent frames
        video_s = engine.load()["backlog_s"] - image_s
        assert image_s == pytest.approx(4 * 0.18 / 2)
        assert video_s == pytest.approx(9 * image_s)
    finally:
        engine.stop(drain=False, timeout=1.0)
