"""`bench engine`'s pure parts: the peer's replay, pooled live rounds and their order."""

from __future__ import annotations

import pytest

from stepfleet.serving.bench.engine_bench import PAIR, POLICIES, live_order
from stepfleet.serving.bench.replay import CostTable, peer_call_s, replay_engine, replay_peer
from stepfleet.serving.bench.trace import TraceRequest, live_stats, poisson_trace, pooled_stats
from stepfleet.serving.planner import PlannerConfig

# Batching pays: four images (8 UNet rows) cost twice one image's step.
TABLE = CostTable(step_s_by_rows={2: 0.05, 4: 0.065, 6: 0.08, 8: 0.1}, encode_s=0.01, decode_s=0.04,
                  fifo_step_s=0.05, fifo_overhead_s=0.06)


def req(i: int, at: float, steps: int) -> TraceRequest:
    return TraceRequest(id=f"r{i}", arrival_s=at, steps=steps, scheduler="ddim", seed=i, prompt="p")


def test_a_pipeline_call_scales_the_plain_pipeline_by_the_measured_batch_curve():
    assert peer_call_s(TABLE, 1, 10) == pytest.approx(0.06 + 10 * 0.05)
    # Four requests: three more encodes and decodes, each step at the 8-row cost (2x the 2-row step).
    assert peer_call_s(TABLE, 4, 10) == pytest.approx(0.06 + 3 * 0.05 + 10 * 0.1)


def test_the_peer_waits_for_its_batch_then_runs_each_step_count_as_one_call():
    # r0 at 0; r1 (same steps) within the 0.1 s wait; r2 (other steps) too; r3 after the wait.
    trace = [req(0, 0.0, 10), req(1, 0.05, 10), req(2, 0.08, 20), req(3, 0.5, 10)]
    out = replay_peer(trace, TABLE, max_batch=4, wait_s=0.1)
    first = 0.1 + peer_call_s(TABLE, 2, 10)  # the batch closes at 0.1; r0 and r1 share one call
    second = first + peer_call_s(TABLE, 1, 20)  # then r2's group
    third = max(second, 0.5) + 0.1 + peer_call_s(TABLE, 1, 10)  # r3 arrived while they ran: its own wait
    expected = [first - 0.0, first - 0.05, second - 0.08, third - 0.5]
    assert out["completed"] == 4
    assert out["mean_s"] == pytest.approx(sum(expected) / 4)


def test_a_full_batch_closes_without_waiting():
    trace = [req(i, 0.0, 10) for i in range(4)]
    out = replay_peer(trace, TABLE, max_batch=4, wait_s=5.0)
    assert out["mean_s"] == pytest.approx(peer_call_s(TABLE, 4, 10))


def test_continuous_beats_the_peer_on_a_table_where_batching_pays():
    cap = 1.0 / (0.06 + 20 * 0.05)
    for load in (0.7, 1.2):
        trace = poisson_trace(load * cap, 400, seed=3)
        cont = replay_engine(trace, TABLE, PlannerConfig(max_batch=4))
        peer = replay_peer(trace, TABLE, 4)
        assert cont["mean_s"] < peer["mean_s"]


def test_pooled_rounds_pool_latencies_and_sum_spans():
    a = live_stats([0.0, 1.0], [2.0, 3.0])  # latencies 2, 2; span 3
    b = live_stats([0.0, 0.0, 0.0], [1.0, 1.0, 4.0])  # latencies 1, 1, 4; span 4
    pooled = pooled_stats([a, b])
    assert pooled["completed"] == 5 and pooled["rounds"] == 2
    assert pooled["mean_s"] == pytest.approx(10 / 5)
    assert pooled["throughput_rps"] == pytest.approx(5 / 7)
    assert pooled["p95_s"] == 4.0 and sorted(pooled["latencies_s"]) == [1.0, 1.0, 2.0, 2.0, 4.0]
    # Round a: mean 2, p95 2; round b: mean 2, p95 4 -> the same server moved 1x in mean, 2x in p95.
    assert pooled["round_spread"] == {"mean": pytest.approx(1.0), "p95": pytest.approx(2.0)}


def test_live_rounds_run_every_policy_once_then_the_pair_in_alternating_order():
    assert [p for _, p in live_order(1)] == list(POLICIES)
    two = [p for _, p in live_order(2)]
    assert two == [*POLICIES, *PAIR[::-1]]
    assert two[-4:] == ["peer", "continuous", "continuous", "peer"]  # A B B A
    assert [p for _, p in live_order(3)][-2:] == list(PAIR)
    assert [p for _, p in live_order(2, baselines=False)] == [*PAIR, *PAIR[::-1]]


def test_the_fifo_probe_serves_each_step_count_of_the_mix_back_to_back():
    """`--noise` sets its live loads from this probe (a live backlog), not from a line through two timings."""
    import time
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from stepfleet.serving.bench.engine_bench import BenchConfig, fifo_probe_rps
    from stepfleet.serving.bench.trace import STEP_MIX

    calls: list[tuple[int, str]] = []

    class Pipeline:
        scheduler = DDIMScheduler()

        def __call__(self, prompt, *, num_inference_steps, **kwargs):
            calls.append((num_inference_steps, type(self.scheduler).__name__))
            time.sleep(0.01)

    pipe = Pipeline()
    rate = fifo_probe_rps(SimpleNamespace(pipeline=pipe), BenchConfig(size=64), ("ddim", "euler"), rounds=2)
    assert [n for n, _ in calls] == [STEP_MIX[0], *STEP_MIX, *STEP_MIX]  # one warm-up call, then the backlog
    assert {s for _, s in calls[1:]} == {"DDIMScheduler", "EulerDiscreteScheduler"}
    assert 0 < rate <= 1 / 0.01  # six calls of at least 10 ms each, served one after another
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the model's own scheduler is put back


def test_the_speed_probe_times_single_image_steps_after_a_warm_step():
    """`bench engine` times the machine before each live round; the warm-up step is not counted."""
    import time
    from types import SimpleNamespace

    from stepfleet.serving.bench.engine_bench import BenchConfig, probe_step_s

    sleeps = iter([0.2] + [0.01] * 8)
    stepped: list[int] = []

    class Runner:
        def prepare(self, params, seed):
            assert params.num_inference_steps == 9 and params.scheduler == "euler"
            return SimpleNamespace(state="s")

        def step(self, batch):
            stepped.append(len(batch))
            time.sleep(next(sleeps))

    s = probe_step_s(Runner(), BenchConfig(size=64), "euler")
    assert stepped == [1] * 9  # one image per step: one warm-up, eight timed
    assert 0.01 <= s < 0.1  # the slow warm-up step is left out of the median


def test_machine_during_compares_the_probe_over_each_servers_rounds():
    from stepfleet.serving.bench.engine_bench import machine_during

    runs = {"peer": [{"probe_step_s": 0.030}, {"probe_step_s": 0.050}],
            "continuous": [{"probe_step_s": 0.060}, {"probe_step_s": 0.060}]}
    m = machine_during(runs, "continuous", "peer")
    assert m == {"continuous_probe_s": pytest.approx(0.06), "peer_probe_s": pytest.approx(0.04),
                 "continuous_vs_peer": pytest.approx(1.5)}
    assert machine_during({"peer": [{}], "continuous": [{"probe_step_s": 0.1}]}, "continuous", "peer") is None
