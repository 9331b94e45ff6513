"""The live engine: step-boundary joins, cancellation, isolation of failures, overload, shutdown."""

import time
from concurrent.futures import wait

import pytest

from stepfleet.serving.engine import Engine, EngineConfig, QueueFull, RequestCancelled, ShuttingDown
from stepfleet.serving.params import GenerationParams, Priority
from tests.serving.fakes import FakeRunner, labels


def gp(prompt, steps=5, n=1, size=256, **kw):
    return GenerationParams(prompt=prompt, width=size, height=size, num_inference_steps=steps, n=n, **kw)


@pytest.fixture
def fake():
    return FakeRunner()


@pytest.fixture
def engine(fake):
    e = Engine(fake, EngineConfig(max_batch=2, max_queue=8)).start()
    yield e
    e.stop(drain=False, timeout=5)


def test_all_requests_complete_with_their_own_images(engine):
    reqs = [engine.submit(gp(f"p{i}", steps=3 + i)) for i in range(5)]
    results = [r.future.result(timeout=10) for r in reqs]
    assert [labels(res) for res in results] == [[f"p{i}#0"] for i in range(5)]


def test_batch_never_exceeds_max_and_late_request_joins_running_batch(engine, fake):
    first = engine.submit(gp("long", steps=40))
    while not fake.batches:
        time.sleep(0.001)
    late = engine.submit(gp("late", steps=3))
    late.future.result(timeout=10)
    first.future.result(timeout=10)
    assert all(len(b) <= 2 for b in fake.batches)
    # `late` ran alongside `long` rather than waiting for it to finish.
    assert any(set(b) == {"long", "late"} for b in fake.batches)
    assert fake.batches[-1] == ["long"]


def test_shapes_never_mix_in_one_step(engine, fake):
    reqs = [engine.submit(gp(f"s{i}", steps=4, size=256 if i % 2 else 128)) for i in range(6)]
    wait([r.future for r in reqs], timeout=10)
    for batch in fake.batches:
        sizes = {int(p[1:]) % 2 for p in batch}
        assert len(sizes) == 1


def test_cancel_frees_the_slot_at_the_next_step(engine, fake):
    doomed = engine.submit(gp("doomed", steps=500))
    while not fake.batches:
        time.sleep(0.001)
    assert engine.cancel(doomed.id)
    with pytest.raises(RequestCancelled):
        doomed.future.result(timeout=5)
    steps_of_doomed = sum(b.count("doomed") for b in fake.batches)
    assert steps_of_doomed < 500
    assert labels(engine.submit(gp("next", steps=2)).future.result(timeout=5)) == ["next#0"]


def test_failing_prepare_fails_only_that_request(engine):
    bad = engine.submit(gp("boom"))
    good = engine.submit(gp("fine"))
    with pytest.raises(ValueError):
        bad.future.result(timeout=5)
    assert labels(good.future.result(timeout=5)) == ["fine#0"]


def test_failing_step_is_isolated_to_the_bad_request(engine):
    bad = engine.submit(gp("crash", steps=3))
    good = engine.submit(gp("fine", steps=3))
    with pytest.raises(RuntimeError):
        bad.future.result(timeout=5)
    assert labels(good.future.result(timeout=5)) == ["fine#0"]
    assert labels(engine.submit(gp("after", steps=1)).future.result(timeout=5)) == ["after#0"]


def test_queue_full_raises_with_retry_estimate(fake):
    fake.gate.clear()  # stall the step loop so work piles up
    e = Engine(fake, EngineConfig(max_batch=1, max_queue=2)).start()
    try:
        reqs = []
        with pytest.raises(QueueFull) as err:
            for i in range(10):
                reqs.append(e.submit(gp(f"q{i}", steps=10)))
        # Two queued, plus at most one already running behind the stalled step.
        assert 2 <= len(reqs) <= 3
        assert err.value.retry_after_s >= 1
    finally:
        fake.gate.set()
        e.stop(drain=True, timeout=10)
    assert all(r.future.done() for r in reqs)


def test_high_priority_preempts_and_paused_request_resumes(fake):
    fake.step_s = 0.01
    e = Engine(fake, EngineConfig(max_batch=1)).start()
    try:
        low = e.submit(gp("low", steps=30))
        while not fake.batches:
            time.sleep(0.001)
        vip = e.submit(gp("vip", steps=3, priority=Priority.HIGH))
        vip_res = vip.future.result(timeout=5)
        low_res = low.future.result(timeout=5)
    finally:
        e.stop(drain=False, timeout=5)
    assert labels(vip_res) == ["vip#0"] and labels(low_res) == ["low#0"]
    order = [b[0] for b in fake.batches]
    first_vip = order.index("vip")
    assert "low" in order[first_vip + 3 :]  # low resumed after vip finished
    assert order.count("low") == 30  # and ran exactly its own steps: none lost, none repeated


def test_n_images_per_request(engine):
    assert labels(engine.submit(gp("many", steps=2, n=2)).future.result(timeout=5)) == ["many#0", "many#1"]


def test_stop_drains_running_requests_and_refuses_new_ones(fake):
    e = Engine(fake, EngineConfig(max_batch=2)).start()
    reqs = [e.submit(gp(f"d{i}", steps=20)) for i in range(3)]
    e.stop(drain=True, timeout=10)
    assert all(labels(r.future.result(timeout=0)) for r in reqs)
    with pytest.raises(ShuttingDown):
        e.submit(gp("late"))


def test_load_reports_outstanding_work(fake):
    fake.gate.clear()
    e = Engine(fake, EngineConfig(max_batch=1)).start()
    try:
        e.submit(gp("a", steps=10))
        e.submit(gp("b", steps=10))
        time.sleep(0.1)
        load = e.load()
        assert load["running"] + load["waiting"] == 2
        assert load["step_units"] > 0 and load["backlog_s"] > 0
    finally:
        fake.gate.set()
        e.stop(drain=True, timeout=10)
