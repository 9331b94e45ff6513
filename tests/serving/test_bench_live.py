"""The peer baseline of `bench engine`: Ray Serve / LitServe-style dynamic batching, no model."""

import time
from dataclasses import dataclass

from stepfleet.serving.bench.live import cpu_noise, serve_dynamic_batches


@dataclass(frozen=True)
class Req:
    id: str
    arrival_s: float
    steps: int


def test_collects_up_to_max_batch_and_runs_each_step_count_as_one_call():
    calls: list[list[str]] = []

    def run_group(group):
        calls.append([r.id for r in group])
        time.sleep(0.01)

    # Five at once, then one long after the 0.1 s wait: the first batch takes four (max batch),
    # split by step count; the fifth forms the next batch; the late one its own.
    trace = [Req(f"r{i}", 0.0, 10 if i % 2 else 20) for i in range(5)] + [Req("late", 0.5, 10)]
    stats = serve_dynamic_batches(trace, run_group, lambda r: r.steps, max_batch=4, wait_s=0.1)
    assert calls == [["r0", "r2"], ["r1", "r3"], ["r4"], ["late"]]
    assert stats["completed"] == 6


def test_waits_for_the_batch_to_fill_at_most_the_timeout():
    calls: list[tuple[float, list[str]]] = []
    t0 = time.monotonic()
    trace = [Req("a", 0.0, 10), Req("b", 0.05, 10), Req("c", 0.4, 10)]
    serve_dynamic_batches(trace, lambda g: calls.append((time.monotonic() - t0, [r.id for r in g])),
                          lambda r: r.steps, max_batch=4, wait_s=0.1)
    assert [ids for _, ids in calls] == [["a", "b"], ["c"]]  # `b` came within 0.1 s of `a`; `c` did not
    assert 0.09 <= calls[0][0] < 0.35


def test_noise_process_runs_only_inside_the_block():
    import os

    with cpu_noise() as pid:
        assert pid is not None
        os.kill(pid, 0)  # alive
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
    with cpu_noise(False) as none:
        assert none is None
