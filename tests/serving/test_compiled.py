"""The compiled denoiser (issue 20) on the CPU: exactness per bucket, padding, no recompilation, errors.

The tests compile with dynamo's `aot_eager` backend: the same graph capture, guards and
per-bucket specialisation as inductor (what the recompilation counters count), without the
30-70 s per graph that inductor's C++ code generation takes on two cores. Inductor's own
numbers (1.4-1.6e-6 relative to eager on the CPU, 1.6-2.1e-3 in float16 on an H200) come from
`stepfleet bench compile` (docs/benchmarks.md); the slow test below runs it on one bucket.
"""

import contextlib
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from stepfleet.serving.compiled.buckets import RowBuckets, ShapeBuckets
from stepfleet.serving.compiled.denoiser import (
    CompiledDenoiser,
    CompileFailed,
    CompileOptions,
    dynamo_counters,
)
from stepfleet.serving.params import GenerationParams, InvalidParam
from stepfleet.serving.runner import ModelRunner

SIZE = 64  # 8x8 latents
TOL = 1e-4


def gp(prompt="a red cat", steps=4, guidance=7.5, n=1, seed=0, size=SIZE):
    return GenerationParams(prompt=prompt, width=size, height=size, n=n, num_inference_steps=steps,
                            guidance_scale=guidance, seed=seed)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def compiled_runner(tiny_backbone):
    shape = tiny_backbone.latent_shape(SIZE, SIZE)
    buckets = ShapeBuckets(rows=RowBuckets((2, 4, 8)), shapes=(shape,), sizes=((SIZE, SIZE),))
    compiled = CompiledDenoiser(tiny_backbone, buckets, CompileOptions(backend="aot_eager"))
    compiled.warm_up({shape: compiled.conditioning_rows(SIZE, SIZE)})
    return ModelRunner(tiny_backbone, compiled=compiled)


def run(runner, batch_params, steps):
    states = [runner.prepare(p, p.seed).state for p in batch_params]
    for _ in range(steps):
        runner.step(states)
    return states


def test_compiled_equals_eager_in_every_bucket_and_under_padding(compiled_runner, runner):
    solo_eager = run(runner, [gp(seed=1)], 4)[0].latents
    solo_compiled = run(compiled_runner, [gp(seed=1)], 4)[0].latents
    assert rel(solo_compiled, solo_eager) < TOL
    # 2 + 2 + 2 rows: padded into bucket 8; the target equals its solo run.
    mixed = run(compiled_runner, [gp(seed=1), gp("a dog", seed=2), gp("a boat", seed=3)], 4)[0].latents
    assert rel(mixed, solo_eager) < TOL
    # An unguided request (1 row) pads into bucket 2.
    unguided_eager = run(runner, [gp(guidance=1.0, seed=4)], 3)[0].latents
    unguided = run(compiled_runner, [gp(guidance=1.0, seed=4)], 3)[0].latents
    assert rel(unguided, unguided_eager) < TOL
    stats = compiled_runner.compiled.snapshot()
    assert stats.compiled_calls > 0 and stats.eager_calls == {}


class Hooking:
    """An add-on that changes the denoiser on the steps of one request (as LoRA or a cached edit do)."""

    def __init__(self, target):
        self.target, self.entered = target, 0

    def prepare(self, state):
        pass

    def denoising(self, batch):
        if not any(r.params.prompt == self.target for r in batch):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def hooked():
            self.entered += 1
            yield

        return hooked()

    def after_step(self, state, latents):
        return latents

    def finish(self, state, decode):
        return None


def test_steps_an_add_on_changes_run_eager_and_compile_nothing(compiled_runner, runner):
    hooking = Hooking("a hooked prompt")
    hooked = ModelRunner(compiled_runner.backbone, extensions=[hooking], compiled=compiled_runner.compiled)
    before_graphs = dynamo_counters()["unique_graphs"]
    before = dict(compiled_runner.compiled.snapshot().eager_calls)
    target = run(hooked, [gp("a hooked prompt", seed=5), gp(seed=6)], 3)[0].latents
    plain = run(hooked, [gp(seed=6)], 2)
    after = compiled_runner.compiled.snapshot().eager_calls
    assert hooking.entered == 3 and after.get("add-on", 0) - before.get("add-on", 0) == 3
    assert rel(target, run(runner, [gp("a hooked prompt", seed=5)], 3)[0].latents) < TOL
    assert plain[0].step_index == 2 and dynamo_counters()["unique_graphs"] == before_graphs


def test_a_size_outside_every_bucket_is_refused_not_compiled(compiled_runner):
    before = dynamo_counters()["unique_graphs"]
    with pytest.raises(InvalidParam) as err:
        compiled_runner.prepare(gp(size=128), 0)
    assert err.value.param == "size" and "64x64" in str(err.value)
    assert dynamo_counters()["unique_graphs"] == before


def test_a_bucket_that_fails_to_compile_names_itself():
    def denoise(sample, timestep, cond, extras=None):
        if sample.shape[0] == 4:
            raise RuntimeError("no kernel for this shape")
        return sample * 2

    backbone = SimpleNamespace(device=torch.device("cpu"), denoise=denoise)
    buckets = ShapeBuckets(rows=RowBuckets((2, 4)), shapes=((4, 8, 8),), sizes=((64, 64),))
    compiled = CompiledDenoiser(backbone, buckets, CompileOptions(backend="aot_eager"))
    with pytest.raises(CompileFailed, match="bucket 4x4x8x8"):
        compiled.warm_up({(4, 8, 8): {"encoder_hidden_states": torch.zeros(1, 3, 5)}})
    assert compiled.snapshot().buckets_done == 1
    assert "bucket 4x4x8x8" in compiled.snapshot().error


def test_cuda_graph_mode_needs_cuda():
    with pytest.raises(CompileFailed, match="needs a CUDA device"):
        CompileOptions(mode="reduce-overhead").resolved(torch.device("cpu"))
    assert CompileOptions().resolved(torch.device("cuda")) == ("inductor", "reduce-overhead")
    assert CompileOptions().resolved(torch.device("cpu")) == ("inductor", "default")


def test_compiled_worker_runs_a_long_mixed_trace_without_recompiling(tiny_model, serve_app):
    """Joins, leaves, preemptions, different step counts, guided and unguided rows, several images:
    the graphs compiled at warm-up are all there ever are."""
    from stepfleet.serving.app import create_app
    from stepfleet.serving.settings import WorkerSettings

    settings = WorkerSettings(model="tiny-sd", compile=True, compile_backend="aot_eager", max_batch=2,
                              bucket_sizes=f"{SIZE}x{SIZE}", default_steps=3)
    app = create_app(settings)
    with serve_app(app, timeout_s=300) as base:
        state = app.state.worker
        graphs = dynamo_counters()["unique_graphs"]
        assert state.compiled.snapshot().buckets_done == 3  # rows 1, 2, 4 (default for max batch 2)
        ready = httpx.get(base + "/readyz").json()
        assert ready["status"] == "ready"

        results: list[httpx.Response] = []

        def post(body):
            with httpx.Client(base_url=base, timeout=300) as client:
                results.append(client.post("/v1/images/generations", json=body))

        bodies = []
        for i in range(12):
            body = {"prompt": f"prompt {i}", "size": f"{SIZE}x{SIZE}", "num_inference_steps": 2 + i % 4,
                    "seed": i, "response_format": "b64_json"}
            if i % 3 == 0:
                body["guidance_scale"] = 1.0  # one row per image
            if i % 4 == 1:
                body["n"] = 2
            if i % 5 == 4:
                body["priority"] = "high"  # overtakes running work at a step boundary
            bodies.append(body)
        threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [r.status_code for r in results] == [200] * len(bodies)

        refused = httpx.post(base + "/v1/images/generations", json={"prompt": "big", "size": "128x128"})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "size" and "64x64" in refused.json()["error"]["message"]

        assert dynamo_counters()["unique_graphs"] == graphs  # nothing compiled after warm-up
        stats = state.compiled.snapshot()
        assert stats.eager_calls == {} and stats.compiled_calls > 12
        metrics = httpx.get(base + "/metrics").text
        assert 'stepfleet_compile_buckets{pool="local",state="compiled"} 3.0' in metrics
        assert 'stepfleet_compiled_steps{path="compiled",pool="local"}' in metrics


def test_a_worker_whose_compile_fails_stays_unready_with_the_error(serve_app):
    from stepfleet.serving.app import create_app
    from stepfleet.serving.settings import WorkerSettings

    settings = WorkerSettings(model="tiny-sd", compile=True, compile_mode="reduce-overhead", warmup=False)
    app = create_app(settings)
    with serve_app(app, ready_path=None) as base:
        deadline, start = 120, time.monotonic()
        while True:
            body = httpx.get(base + "/readyz").json()
            if body["status"] != "loading" or time.monotonic() - start > deadline:
                break
            time.sleep(0.1)
        assert body["status"] == "failed"
        assert body["error"].startswith("CompileFailed: compile mode reduce-overhead")


@pytest.mark.slow
def test_inductor_matches_eager_on_one_bucket(tiny_backbone):
    shape = tiny_backbone.latent_shape(SIZE, SIZE)
    buckets = ShapeBuckets(rows=RowBuckets((2,)), shapes=(shape,), sizes=((SIZE, SIZE),))
    compiled = CompiledDenoiser(tiny_backbone, buckets, CompileOptions(backend="inductor"))
    row = compiled.conditioning_rows(SIZE, SIZE)
    compiled.warm_up({shape: row})
    with torch.inference_mode():
        sample = torch.randn(2, *shape)
        t = torch.tensor([900.0, 100.0])
        cond = {k: v.expand(2, *v.shape[1:]).clone() for k, v in row.items()}
        assert rel(compiled(sample, t, cond), tiny_backbone.denoise(sample, t, cond)) < TOL
