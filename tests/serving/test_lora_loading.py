"""The adapter cache and bounded loading: tiers with LRU and pins, loads off the step loop, failures isolated.

- a device tier of one adapter's size evicts the least recently used idle adapter, never a
  pinned one; a host tier of zero bytes makes every load read the disk tier again;
- `lora_wait: bounded` runs the first steps while the adapter loads (counted in the report) and
  waits for it at step K; `full` waits from the start — the two images differ by what the
  early steps missed (printed), and with the adapter already resident they are equal;
- a load that fails fails only the requests that asked for that adapter.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from stepfleet.serving.adapters.extension import LoraExtension
from stepfleet.serving.adapters.registry import AdapterRegistry
from stepfleet.serving.adapters.segments import Segment, plan_groups, uniform_block
from stepfleet.serving.params import GenerationParams, LoraRef, LoraSpec
from tests.serving.lora_files import lora_bytes

SIZE = 64
STEPS = 4


def gp(adapters=(), wait="bounded", seed=1, guidance=7.5) -> GenerationParams:
    spec = LoraSpec(tuple(LoraRef(n, s) for n, s in adapters), wait=wait) if adapters else None
    return GenerationParams(prompt="a lighthouse", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                            guidance_scale=guidance, seed=seed, lora=spec)


def test_row_groups_follow_the_batch_layout():
    rows, groups = plan_groups([
        Segment(2, [("a", 0.5)]),  # guided, n=1: [negative, positive]
        Segment(4, []),  # no adapters: in no group
        Segment(2, [("a", 1.0), ("b", 0.3)]),
        Segment(1, [("b", 0.3), ("b", 0.2), ("c", 0.0)]),  # twice: scales add; zero: skipped
    ])
    assert rows == 9
    (a, b) = groups
    assert a.adapter == "a" and a.rows == (0, 1, 6, 7) and a.span is None and a.uniform_scale is None
    assert b.adapter == "b" and b.rows == (6, 7, 8) and b.span == (6, 9)
    assert b.scales == pytest.approx((0.3, 0.3, 0.5)) and b.uniform_scale is None
    (only,) = plan_groups([Segment(2, [("a", 0.8)]), Segment(1, [("a", 0.8)])])[1]
    assert only.span == (0, 3) and only.uniform_scale == 0.8
    assert uniform_block(groups) is None  # a's rows are not one run
    _, pairs = plan_groups([Segment(2, [("a", 0.5)]), Segment(2, [("b", 1.0)]), Segment(2, [("c", 0.2)])])
    assert uniform_block(pairs) == (0, 6, 2)
    _, uneven = plan_groups([Segment(2, [("a", 0.5)]), Segment(4, [("b", 1.0)])])
    assert uniform_block(uneven) is None
    _, gap = plan_groups([Segment(2, [("a", 0.5)]), Segment(2, []), Segment(2, [("b", 1.0)])])
    assert uniform_block(gap) is None


@pytest.fixture(scope="module")
def backbone():
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model

    return load_backbone(load_model("tiny-sd", device="cpu"))


class GatedDisk:
    """A disk read that waits for `gate` (a slow disk, as long as a test wants)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reads = 0

    def __call__(self, path):
        self.reads += 1
        assert self.gate.wait(30)
        return path.read_bytes()


def registry_for(backbone, **bounds) -> AdapterRegistry:
    sizes = {"device_bytes": 1 << 30, "host_bytes": 1 << 30, "disk_bytes": 1 << 30} | bounds
    return AdapterRegistry(backbone.family, backbone.denoiser, **sizes)


def test_device_tier_is_lru_and_never_evicts_a_pinned_adapter(backbone):
    registry = registry_for(backbone)
    try:
        a = registry.add("a", lora_bytes(backbone.denoiser, rank=2, seed=1))
        registry.add("b", lora_bytes(backbone.denoiser, rank=2, seed=2))
        one = a.host.nbytes
        registry.bounds["device"] = one  # room for one adapter on the device
        lease_a = registry.acquire("a")
        lease_a.wait(10)
        lease_b = registry.acquire("b")  # a is pinned: both stay, over the bound
        lease_b.wait(10)
        assert "device" in registry.get("a").tiers() and "device" in registry.get("b").tiers()
        lease_a.release()  # a is idle now and least recently used: it goes
        assert registry.get("a").tiers() == ["host", "disk"]
        assert "device" in registry.get("b").tiers()
        lease_b.release()
        assert registry.delete("a") and registry.get("a") is None and not registry.delete("a")
    finally:
        registry.close()


def test_host_tier_of_zero_reads_the_disk_tier_again(backbone):
    disk = GatedDisk()
    disk.gate.set()
    registry = AdapterRegistry(backbone.family, backbone.denoiser, device_bytes=0, host_bytes=0, disk_bytes=1 << 30,
                               reader=disk)
    try:
        registry.add("a", lora_bytes(backbone.denoiser, rank=2, seed=1))
        assert registry.get("a").tiers() == ["disk"]
        for expected_reads in (1, 2):
            lease = registry.acquire("a")
            assert lease.wait(10).rank == 2
            lease.release()
            assert disk.reads == expected_reads and registry.get("a").tiers() == ["disk"]
    finally:
        registry.close()


def run(runner, states) -> None:
    while any(s.steps_left for s in states):
        runner.step([s for s in states if s.steps_left])


def test_bounded_loading_starts_at_once_and_takes_the_adapter_by_step_k(backbone):
    from stepfleet.serving.runner import ModelRunner

    disk = GatedDisk()
    registry = AdapterRegistry(backbone.family, backbone.denoiser, device_bytes=1 << 30, host_bytes=0,
                               disk_bytes=1 << 30, reader=disk)
    ext = LoraExtension(backbone.denoiser, registry, max_unloaded_steps=2)
    runner = ModelRunner(backbone, extensions=[ext])
    try:
        registry.add("a", lora_bytes(backbone.denoiser, rank=4, seed=3))
        bounded = runner.prepare(gp([("a", 1.0)]), 1).state
        runner.step([bounded])
        runner.step([bounded])  # two steps while the disk is slow
        assert bounded.params.lora.report.steps_without == 2
        threading.Timer(0.2, disk.gate.set).start()
        run(runner, [bounded])  # step 2 waits for the load
        report = bounded.params.lora.report
        assert report.steps_without == 2 and report.waited_s > 0.1
        # Now resident: `full` and `bounded` give the same image; it differs from the early-start one.
        full = runner.prepare(gp([("a", 1.0)], wait="full"), 1).state
        again = runner.prepare(gp([("a", 1.0)]), 1).state
        run(runner, [full, again])
        assert again.params.lora.report.steps_without == 0
        np.testing.assert_allclose(again.latents, full.latents, rtol=1e-4, atol=1e-5)
        diff = float((bounded.latents - full.latents).abs().mean() / full.latents.abs().mean())
        print(f"bounded (2 steps of {STEPS} without the adapter) vs full waiting: mean relative latent difference "
              f"{diff:.4f}")
        assert diff > 1e-3
    finally:
        registry.close()


def test_a_failed_load_fails_only_the_requests_that_wait_for_it(backbone):
    from stepfleet.serving.engine import Engine, EngineConfig
    from stepfleet.serving.runner import ModelRunner

    registry = AdapterRegistry(backbone.family, backbone.denoiser, device_bytes=0, host_bytes=0, disk_bytes=1 << 30)
    ext = LoraExtension(backbone.denoiser, registry, max_unloaded_steps=0)
    engine = Engine(ModelRunner(backbone, extensions=[ext]), EngineConfig(max_batch=4)).start()
    try:
        entry = registry.add("broken", lora_bytes(backbone.denoiser, rank=2, seed=4))
        entry.path.unlink()  # an upload's only copy is gone: the load fails (I/O), and nothing else does
        registry.add("fine", lora_bytes(backbone.denoiser, rank=2, seed=5))
        doomed = engine.submit(gp([("broken", 1.0)]))
        others = [engine.submit(gp(seed=2)), engine.submit(gp([("fine", 0.5)], seed=3))]
        with pytest.raises(FileNotFoundError):
            doomed.future.result(120)
        for req in others:
            assert len(req.future.result(120).images) == 1
    finally:
        engine.stop(drain=False)
        registry.close()


def test_a_lora_request_beside_a_cached_edit_is_correct(backbone, caplog):
    """Masked compute runs sub-batches the row plan cannot map: the hook refuses, the engine runs the
    step's requests one by one, and both results are what they are alone."""
    import torch

    from stepfleet.serving.contracts import EditPath
    from stepfleet.serving.edits.cache import TemplateCache
    from stepfleet.serving.edits.extension import EditExtension
    from stepfleet.serving.edits.templates import Template, TemplateKey, image_digest, record_params
    from stepfleet.serving.engine import Engine, EngineConfig
    from stepfleet.serving.params import EditSpec
    from stepfleet.serving.runner import ModelRunner

    cache = TemplateCache(max_bytes=64 << 20)
    edits = EditExtension(backbone, cache)
    registry = registry_for(backbone)
    lora = LoraExtension(backbone.denoiser, registry)
    engine = Engine(ModelRunner(backbone, extensions=[edits, lora]), EngineConfig(max_batch=4)).start()
    try:
        registry.add("a", lora_bytes(backbone.denoiser, rank=2, seed=8))
        rng = np.random.default_rng(0)
        from PIL import Image

        image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        template = Template(id="t", key=TemplateKey(SIZE, SIZE, STEPS, "ddim", 7.5, 3), prompt="t", image=image,
                            digest=image_digest(image))
        edits.add_template(template)
        engine.submit(record_params(template)).future.result(120)
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        mask[8:32, 8:32] = True
        edit = GenerationParams(prompt="an edit", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                                guidance_scale=7.5, scheduler="ddim", seed=3,
                                edit=EditSpec(template_id="t", pixel_mask=mask))
        styled = gp([("a", 1.0)], wait="full", seed=5)
        together = [engine.submit(edit), engine.submit(styled)]
        edited, mixed = (r.future.result(120) for r in together)
        assert edited.edit_path is EditPath.CACHED
        assert "RowMismatch" in caplog.text  # they did share a step: the hook refused it, the engine split it
        alone = engine.submit(styled).future.result(120)
        assert np.array_equal(np.asarray(mixed.images[0]), np.asarray(alone.images[0]))
    finally:
        engine.stop(drain=False)
        registry.close()
        edits.close()
        cache.close()
