"""Images and videos on one live engine (fake runner): a video yields to an image at a step
boundary, per-kind SLOs set deadlines, per-kind metrics move, and the operator renders slo.image/video."""

import time

from prometheus_client import generate_latest

from stepfleet.serving.contracts import RequestKind
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.metrics import WorkerMetrics
from stepfleet.serving.params import GenerationParams
from tests.serving.fakes import FakeRunner


def test_a_running_video_pauses_for_an_image_with_a_per_kind_slo():
    runner = FakeRunner(step_s=0.01)
    metrics = WorkerMetrics(pool="p")
    engine = Engine(runner, EngineConfig(max_batch=2, slo_image_s=0.5, slo_video_s=30.0), observer=metrics).start()
    try:
        video = engine.submit(GenerationParams(prompt="video", width=256, height=256, num_inference_steps=150,
                                               guidance_scale=1.0), kind=RequestKind.VIDEO)
        deadline = time.monotonic() + 10
        while (video.seq is None or video.seq.steps_done < 5) and time.monotonic() < deadline:
            time.sleep(0.005)
        image = engine.submit(GenerationParams(prompt="image", width=128, height=128, num_inference_steps=10,
                                               guidance_scale=1.0))
        image.future.result(timeout=10)
        assert not video.future.done()  # the image overtook the running video
        assert image.seq.explicit_deadline and image.deadline_met  # the per-kind SLO, met
        video.future.result(timeout=20)
        assert video.seq.kind == "video" and video.seq.deadline - video.arrival == 30.0
    finally:
        engine.stop()
    text = generate_latest(metrics.registry).decode()
    assert 'stepfleet_video_preemptions_total{pool="p"} 1.0' in text
    assert 'stepfleet_slo_requests_total{kind="generation",outcome="met",pool="p"} 1.0' in text
    assert 'stepfleet_slo_requests_total{kind="video",outcome="met",pool="p"} 1.0' in text
    assert 'stepfleet_paused_videos{pool="p"} 0.0' in text


def test_the_operator_renders_per_kind_slos_into_the_worker_command():
    from stepfleet.operator.children.workers import worker_settings
    from stepfleet.operator.models import DiffusionServiceSpec
    from tests.operator.k8s_helpers import example

    raw = example("cpu-fleet.yaml")["spec"]
    raw["slo"] = {**raw["slo"], "image": 2.0, "video": 120.0}
    spec = DiffusionServiceSpec.model_validate(raw)
    settings = worker_settings(spec, spec.pools[0])
    assert (settings.slo_image_s, settings.slo_video_s) == (2.0, 120.0)
    argv = settings.to_argv()
    assert argv[argv.index("--slo-video-s") + 1] == "120.0"


def test_the_per_kind_counts_are_read_now_not_left_from_the_last_plan():
    """The soak found `stepfleet_kind_queue_depth` stuck at 4 after the queue had emptied by
    cancellations (the gauge was set only when a step was planned); the scrape now reads
    `Engine.kinds()`."""
    runner = FakeRunner(step_s=0.05)
    engine = Engine(runner, EngineConfig(max_batch=1)).start()
    try:
        first = engine.submit(GenerationParams(prompt="a", width=128, height=128, num_inference_steps=40,
                                               guidance_scale=1.0))
        queued = [engine.submit(GenerationParams(prompt=f"q{i}", width=128, height=128, num_inference_steps=5,
                                                 guidance_scale=1.0)) for i in range(3)]
        video = engine.submit(GenerationParams(prompt="v", width=128, height=128, num_inference_steps=5,
                                               guidance_scale=1.0), kind=RequestKind.VIDEO)
        deadline = time.monotonic() + 10
        while engine.kinds() != ({"image": 3, "video": 1}, 0) and time.monotonic() < deadline:
            time.sleep(0.005)  # the first one running, the rest waiting behind it
        assert engine.kinds() == ({"image": 3, "video": 1}, 0)
        for r in [*queued, video]:
            engine.cancel(r.id)
        while sum(engine.kinds()[0].values()) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.kinds() == ({"image": 0, "video": 0}, 0)
        first.future.result(timeout=10)
    finally:
        engine.stop()
