"""`stepfleet bench lora`: the replay's policies on hand-made costs, and one small live run end to end."""

from __future__ import annotations

import json

from stepfleet.serving.bench.lora_replay import (
    NONE,
    POLICIES,
    Costs,
    compositions,
    layout,
    replay,
    trace,
)

# Batching is worth it (4 images cost 2 steps' time), adapters add 10 %, a switch costs half a step.
COSTS = Costs(plain=[0.0, 0.1, 0.13, 0.16, 0.2], mixed=[0.0, 0.11, 0.143, 0.176, 0.22], merge_s=0.05,
              unmerge_s=0.05)


def test_trace_is_seeded_zipf_with_a_share_without_adapters():
    reqs = trace(2000, 5.0, seed=1)
    assert reqs == trace(2000, 5.0, seed=1) and reqs != trace(2000, 5.0, seed=2)
    share = sum(r.adapter == NONE for r in reqs) / len(reqs)
    assert 0.17 < share < 0.23
    counts = [sum(r.adapter == f"lora-{k}" for r in reqs) for k in range(8)]
    assert counts[0] > counts[3] > counts[7] > 0  # Zipf: the first adapter is the most popular
    assert all(b.arrival >= a.arrival for a, b in zip(reqs, reqs[1:], strict=False))


def test_mixed_batches_beat_one_state_batches_and_merging_per_request():
    out = replay(COSTS, steps=10, max_batch=4, n=300, seed=3)
    sat = out["saturation_rps"]
    assert sat["mixed"] > 1.3 * sat["one-state"] and sat["one-state"] > sat["merge-per-request"]
    at9 = out["loads"]["0.9"]
    assert at9["mixed"]["mean_s"] < 0.7 * at9["one-state"]["mean_s"]
    assert at9["mixed"]["p95_s"] >= at9["mixed"]["mean_s"]


def test_one_adapter_traffic_is_the_same_for_both_batchers():
    reqs = [r.__class__(r.arrival, "lora-0") for r in trace(200, 4.0, seed=4)]
    free = Costs(plain=COSTS.plain, mixed=COSTS.plain, merge_s=0.0, unmerge_s=0.0)
    assert POLICIES["mixed"](reqs, free, 10, 4) == POLICIES["one-state"](reqs, free, 10, 4)


def test_compositions_cover_every_batch_and_their_layouts_keep_an_adapters_rows_apart():
    comps = compositions(4)
    assert len(comps) == len(set(comps)) == 20 and (4, 4, 4) in comps and (1, 1, 1) in comps
    for n, m, k in comps:
        lay = layout(n, m, k)
        named = [a for a in lay if a is not None]
        assert len(lay) == n and len(named) == m and set(named) == set(range(k))
    assert layout(4, 4, 2) == [0, 1, 0, 1]  # round-robin: the gather path, not a slice
    assert layout(4, 2, 1) == [0, None, 0, None]


def test_a_step_costs_its_measured_composition_and_falls_back_to_the_upper_bound():
    measured = Costs(plain=COSTS.plain, mixed=COSTS.mixed, merge_s=0.05, unmerge_s=0.05,
                     by_composition={(4, 3, 2): 0.205})
    assert measured.step(4, 3, 2) == 0.205
    assert measured.step(4, 0) == COSTS.plain[4]
    # Unmeasured: the every-image-its-own-adapter overhead, pro rata (never below the base step).
    assert measured.step(4, 2, 1) == COSTS.step(4, 2) == 0.2 + 0.02 * 2 / 4
    # The replay charges a mixed batch by its composition: cheaper compositions, more throughput.
    cheap = Costs(plain=COSTS.plain, mixed=COSTS.mixed, merge_s=0.05, unmerge_s=0.05,
                  by_composition={c: COSTS.plain[c[0]] * 1.01 for c in compositions(4)})
    assert replay(cheap, 10, 4, n=200)["saturation_rps"]["mixed"] > replay(COSTS, 10, 4, n=200)["saturation_rps"]["mixed"]


def test_a_small_live_run_reports_every_figure(capsys):
    from stepfleet.serving.bench.cli import main

    assert main(["lora", "--quick", "--json", "--size", "64", "--steps", "4", "--rank", "4"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert set(result["figures"]) == {"mean_latency_mixed_over_one_state_at_0.9",
                                      "saturation_throughput_mixed_over_one_state",
                                      "unmerged_rank_overhead_every_row",
                                      "unmerged_overhead_every_image_its_own_adapter", "batching_gain",
                                      "saturation_ratio_with_free_adapters"}
    assert result["time_to_first_step"]["load"] > 0
    assert len(result["costs"]["by_composition"]) == 20
    assert result["bounded_vs_full_difference"]["steps_without"] == 2
    assert 0 < result["lora_mac_share"]["sd15 at 512x512"] < 0.05
    assert "mixed/one-state" in out.err
