"""The ControlNet replay (pure): the trace is the issue's, and the policies behave as described."""

from __future__ import annotations

from stepfleet.serving.bench.controlnet_replay import Costs, Request, _batched, replay, trace

# A CPU-like curve: a fixed cost per call plus a per-image cost; a net costs a bit less than the UNet.
COSTS = Costs(plain=[0.0] + [0.03 + 0.02 * k for k in range(1, 5)], net=[0.0] + [0.02 + 0.015 * k for k in range(1, 5)])


def test_trace_has_half_controlled_requests_over_two_nets():
    reqs = trace(2000, 5.0, seed=3)
    controlled = [r for r in reqs if r.controls]
    assert 0.45 < len(controlled) / len(reqs) < 0.55
    assert {r.controls for r in controlled} == {("A",), ("B",)}
    assert all(b.arrival >= a.arrival for a, b in zip(reqs, reqs[1:], strict=False))


def test_same_set_batches_never_mix_sets_and_mixed_batches_do():
    reqs = [Request(0.0, ()), Request(0.0, ("A",)), Request(0.0, ("B",)), Request(0.0, ())]
    mixed = _batched(reqs, COSTS, 2, 4, same_set=False)
    same = _batched(reqs, COSTS, 2, 4, same_set=True)
    # Mixed: one batch of four, two steps, both nets once per step.
    step = COSTS.step(4, {"A": 1, "B": 1})
    assert mixed == [2 * step] * 4
    # Same set: the first request's set (none) runs first; A and B wait for it to drain.
    assert sorted(same)[0] == 2 * COSTS.step(1, {}) and max(same) > max(mixed)


def test_mixed_beats_same_set_at_load_09_on_a_cpu_like_curve():
    out = replay(COSTS, steps=10, max_batch=4, n=300)
    assert out["saturation_rps"]["mixed"] > out["saturation_rps"]["same-set"]
    assert out["loads"]["0.9"]["mean_ratio"] < 0.8


def test_the_benchmark_runs_end_to_end_in_a_tiny_configuration():
    from stepfleet.serving.bench.controlnet_bench import ControlNetBenchConfig, run, summary

    result = run(ControlNetBenchConfig(size=64, steps=4, max_batch=2, reps=1, replay_requests=40, seeds=(0,)))
    assert len(result["controlnet_overhead"]["seconds_by_images"]) == 2
    assert set(result["placement"]["controlled_step_s"]) == {"inline", "overlap"}
    assert set(result["replay"]["loads"]) == {"0.7", "0.9"} and "mean_latency_ratio_at_0.9" in result
    assert "load 0.9" in summary(result)
