"""The live engine: step-boundary joins, cancellation, isolation of failures, overload, shutdown."""

import threading
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


@pytest.fixture(params=["thread", "inline"])
def engine(fake, request):
    e = Engine(fake, EngineConfig(max_batch=2, max_queue=8, aux=request.param)).start()
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


class ThreadRecordingRunner(FakeRunner):
    """Notes which thread ran each kind of call."""

    def __init__(self, device_type=None):
        super().__init__()
        if device_type is not None:
            self.device_type = device_type
        self.threads = {"prepare": set(), "step": set(), "decode": set()}

    def prepare(self, params, seed):
        self.threads["prepare"].add(threading.get_ident())
        return super().prepare(params, seed)

    def step(self, batch):
        self.threads["step"].add(threading.get_ident())
        super().step(batch)

    def decode(self, tensors, keep_latents=False):
        self.threads["decode"].add(threading.get_ident())
        return super().decode(tensors, keep_latents)


@pytest.mark.parametrize(
    ("device_type", "aux", "one_thread"),
    [("cpu", "auto", True), ("cuda", "auto", False), (None, "auto", False), ("cuda", "inline", True),
     ("cpu", "thread", False)],
)
def test_aux_work_runs_on_the_loop_thread_on_cpu_and_beside_it_elsewhere(device_type, aux, one_thread):
    # On a CPU a second torch thread slows every step (libgomp stops spinning once two
    # OpenMP pools exist), so encode/decode must share the loop's thread there.
    runner = ThreadRecordingRunner(device_type)
    e = Engine(runner, EngineConfig(max_batch=2, aux=aux)).start()
    try:
        results = [r.future.result(timeout=10) for r in [e.submit(gp(f"t{i}", steps=3)) for i in range(4)]]
    finally:
        e.stop(drain=True, timeout=5)
    assert [labels(r) for r in results] == [[f"t{i}#0"] for i in range(4)]
    used = runner.threads
    assert used["step"] == {e._thread.ident}
    assert (used["prepare"] | used["decode"] == used["step"]) is one_thread
    assert len(used["prepare"] | used["decode"]) == 1


def test_unknown_aux_mode_is_rejected():
    with pytest.raises(ValueError, match="aux mode"):
        Engine(FakeRunner(), EngineConfig(aux="sometimes"))


def test_calibration_times_each_batch_size_on_the_loop_thread_and_sizes_batches():
    runner = ThreadRecordingRunner("cpu")
    e = Engine(runner, EngineConfig(max_batch=3)).start()
    try:
        curve = e.calibrate(256, 256, guidance_scale=7.5, reps=2)
        assert sorted(curve) == [2, 4, 6]  # UNet rows: guidance doubles each image
        assert all(sec >= runner.step_s for sec in curve.values())
        assert e.cost.seeds(runner.latent_shape(256, 256)) == curve  # seeds the online estimate
        assert runner.threads["step"] == {e._thread.ident}
        # Requests still run normally afterwards.
        assert labels(e.generate(gp("after"), timeout=10)) == ["after#0"]
    finally:
        e.stop(drain=True, timeout=5)


def test_a_failing_loop_call_reports_to_its_caller_and_the_loop_goes_on(engine):
    def broken():
        raise RuntimeError("calibration exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        engine.call_on_loop(broken).result(timeout=5)
    assert engine.call_on_loop(lambda: threading.get_ident()).result(timeout=5) == engine._thread.ident
    assert labels(engine.generate(gp("still fine"), timeout=10)) == ["still fine#0"]


def test_loop_calls_are_refused_once_stopped(fake):
    e = Engine(fake, EngineConfig()).start()
    e.stop(drain=True, timeout=5)
    with pytest.raises(RuntimeError, match="not running"):
        e.call_on_loop(lambda: None)
