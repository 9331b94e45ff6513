"""Batch sizing is visible: the engine learns step costs online and reports its cap, rule and
curve in `/v1/load`, `/metrics` and the log (issue 21) — on a fake runner, no model."""

import itertools
import logging

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stepfleet.serving.app import create_app
from stepfleet.serving.engine import Engine, EngineConfig
from stepfleet.serving.metrics import WorkerMetrics
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.settings import WorkerSettings
from tests.serving.fakes import FakeRunner


def gp(prompt, steps=4):
    return GenerationParams(prompt=prompt, width=256, height=256, num_inference_steps=steps)


def ticking_clock(step_s=0.25):
    """A clock that moves on at every read, so once-a-second refreshes happen within a short test."""
    ticks = itertools.count()
    return lambda: next(ticks) * step_s


def run_some(engine, count=6, steps=4):
    reqs = [engine.submit(gp(f"p{i}", steps)) for i in range(count)]
    for r in reqs:
        r.future.result(timeout=10)


def test_steps_feed_the_online_curve_and_the_report(caplog):
    runner = FakeRunner()
    metrics = WorkerMetrics(pool="p")
    engine = Engine(runner, EngineConfig(max_batch=2), observer=metrics, clock=ticking_clock()).start()
    shape = runner.latent_shape(256, 256)
    try:
        with caplog.at_level(logging.INFO, logger="stepfleet.serving.engine"):
            run_some(engine)
            run_some(engine)
    finally:
        engine.stop(drain=True, timeout=5)
    curve = engine.cost.reference_curve(shape)
    assert curve and all(sec >= runner.step_s * 0.5 for sec in curve.values())
    assert engine.cost.newest > 0  # samples carry the engine's clock, so old ones can age out
    report = engine.batching()
    assert report.mode in ("light", "backlog", "deadline") and 1 <= report.cap_images <= 2
    assert report.reason
    assert "4x32x32" in report.curves
    assert engine.load()["batch_cap"] == report.cap_images
    assert any("batch sizing:" in r.getMessage() for r in caplog.records)
    assert any("step cost by UNet rows at 4x32x32" in r.getMessage() for r in caplog.records)
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    cap = [s for s in families["stepfleet_batch_cap"].samples]
    assert cap and cap[0].value == report.cap_images
    modes = {s.labels["mode"]: s.value for s in families["stepfleet_batch_sizing"].samples}
    assert modes[report.mode] == 1 and sum(modes.values()) == 1
    costs = [s for s in families["stepfleet_step_cost_seconds"].samples if s.labels["shape"] == "4x32x32"]
    assert costs and all(s.value > 0 for s in costs)


def test_load_endpoint_shows_the_cap_its_reason_and_the_curve(serve_app):
    runner = FakeRunner()
    engine = Engine(runner, EngineConfig(max_batch=2), clock=ticking_clock())
    app = create_app(WorkerSettings(pool="vis", warmup=False), engine=engine)
    with serve_app(app) as base:
        run_some(engine)
        run_some(engine)
        body = httpx.get(f"{base}/v1/load", timeout=10).json()
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    batching = body["batching"]
    assert batching["mode"] in ("light", "backlog", "deadline")
    assert body["batch_cap"] == batching["cap_images"]
    assert batching["reason"]
    assert batching["step_s_by_unet_rows"]["4x32x32"]
    assert "stepfleet_batch_cap{" in metrics and "stepfleet_step_cost_seconds{" in metrics


def test_a_backlog_escapes_a_calibration_that_said_batching_is_useless():
    # The fake's steps take 5 ms whatever the batch (batching pays fully), but the seeded curve
    # is linear, as one timed under interference once was. Under a backlog the engine must try
    # bigger batches, find them cheap, and fill them (issue 21's lost throughput).
    runner = FakeRunner(step_s=0.005)
    engine = Engine(runner, EngineConfig(max_batch=4, max_queue=64))
    engine.cost.calibrate(runner.latent_shape(256, 256), {2: 0.005, 4: 0.010, 6: 0.015, 8: 0.020})
    engine.start()
    try:
        run_some(engine, count=24, steps=10)
    finally:
        engine.stop(drain=True, timeout=10)
    sizes = [len(b) for b in runner.batches]
    assert max(sizes) == 4
    assert sum(sizes) / len(sizes) > 3  # not one exploring step: batches stay full while work queues
