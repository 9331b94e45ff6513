"""ControlNet placement: an overlapping executor gives the inline results, and the step loop never
waits on residuals that are not due (a fake executor that holds every job until released)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from stepfleet.serving.params import ControlSpec

from .test_controlnet import TOL, edges, gp, load_nets, rel, run_batch


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return load_nets(tmp_path_factory.mktemp("cn"))


class GatedExecutor:
    """A "slow device": jobs run on a worker thread only once `gate` is set."""

    overlaps = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.submitted = 0
        self._pool = ThreadPoolExecutor(max_workers=1)

    def submit(self, fn: Callable[[], object]) -> Future:
        self.submitted += 1

        def run() -> object:
            self.gate.wait()
            return fn()

        return self._pool.submit(run)

    def shutdown(self) -> None:
        self.gate.set()
        self._pool.shutdown(wait=True)


def make_runner(backbone, nets, executor):
    from stepfleet.serving.controlnet.extension import ControlNetExtension
    from stepfleet.serving.controlnet.registry import ControlNetRegistry, LoadedControlNet
    from stepfleet.serving.controlnet.spec import ControlNetEntry
    from stepfleet.serving.runner import ModelRunner

    registry = ControlNetRegistry([LoadedControlNet(ControlNetEntry(k, k), v) for k, v in nets.items()])
    ext = ControlNetExtension(backbone, registry, executor)
    return ModelRunner(backbone, extensions=[ext]), ext


def finishes(fn: Callable[[], None], timeout: float) -> bool:
    """Run `fn` on a thread; True when it returned within `timeout` seconds."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def test_overlapping_executor_gives_the_inline_results(tiny_backbone, nets):
    from stepfleet.serving.controlnet.placement import InlineExecutor, ThreadExecutor

    requests = [
        (gp([ControlSpec("A", edges(0), conditioning_scale=0.8, guidance_start=0.25)]), 1),
        (gp(prompt="a blue house"), 2),
        (gp([ControlSpec("A", edges(1)), ControlSpec("B", edges(0), guidance_end=0.5)], prompt="a dog"), 3),
    ]
    inline, _ = make_runner(tiny_backbone, nets, InlineExecutor())
    executor = ThreadExecutor()
    overlap, ext = make_runner(tiny_backbone, nets, executor)
    try:
        want, got = run_batch(inline, requests), run_batch(overlap, requests)
    finally:
        executor.shutdown()
    assert ext.stats["prefetch_used"] > 0
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) <= TOL


def test_step_loop_waits_only_for_residuals_that_are_due(tiny_backbone, nets):
    executor = GatedExecutor()
    runner, ext = make_runner(tiny_backbone, nets, executor)
    try:
        a = runner.prepare(gp([ControlSpec("A", edges(0), guidance_start=0.5)]), 1).state  # steps 2, 3 of 4
        b = runner.prepare(gp(prompt="a blue house"), 2).state
        # Steps 0 and 1 are outside A's window: nothing runs, nothing is waited for.
        assert finishes(lambda: runner.step([a, b]), 30)
        assert executor.submitted == 0
        assert finishes(lambda: runner.step([a, b]), 30)
        # ... but after step 1 A's step-2 residuals are on the executor, still held.
        assert executor.submitted == 1 and ext.stats["prefetched"] == 1
        # A step of a batch A is not in does not wait for them.
        assert finishes(lambda: runner.step([b]), 30)
        # A's own step does: it blocks until the slow executor delivers, then uses the prefetch.
        done = threading.Event()
        t = threading.Thread(target=lambda: (runner.step([a]), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.5)
        executor.gate.set()
        assert done.wait(30)
        assert ext.stats["prefetch_used"] == 1
    finally:
        executor.shutdown()


@pytest.mark.parametrize("placement", ["inline", "overlap"])
def test_make_executor(placement):
    from stepfleet.serving.controlnet.placement import make_executor

    ex = make_executor(placement)
    try:
        assert ex.overlaps is (placement == "overlap")
        assert ex.submit(lambda: 41 + 1).result() == 42
    finally:
        ex.shutdown()
    with pytest.raises(ValueError):
        make_executor("gpu-7")


def test_the_unet_encoder_runs_while_due_residuals_are_computed(tiny_backbone, nets):
    """Due residuals are waited for only where the UNet adds them (after its down blocks), so the
    nets overlap with the UNet's encoder (Katz); the result still equals the inline one."""
    from stepfleet.serving.controlnet.placement import InlineExecutor

    executor = GatedExecutor()
    runner, _ = make_runner(tiny_backbone, nets, executor)
    unet = tiny_backbone.denoiser
    encoder_done = threading.Event()
    hook = unet.down_blocks[-1].register_forward_hook(lambda *_: encoder_done.set())
    try:
        params = gp([ControlSpec("A", edges(0)), ControlSpec("B", edges(1), conditioning_scale=0.5)])
        a = runner.prepare(params, 4).state
        done = threading.Event()
        t = threading.Thread(target=lambda: (runner.step([a]), done.set()), daemon=True)
        t.start()
        assert encoder_done.wait(30)  # the down blocks ran with both nets' jobs still held
        assert executor.submitted == 2 and not done.is_set()
        executor.gate.set()
        assert done.wait(30)
    finally:
        hook.remove()
        executor.shutdown()
    inline, _ = make_runner(tiny_backbone, nets, InlineExecutor())
    b = inline.prepare(params, 4).state
    inline.step([b])
    assert rel(a.latents, b.latents) <= TOL
