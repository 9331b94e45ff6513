"""A discrete-event replay of mixed-adapter traffic under three ways of serving LoRA.

Pure (no torch, no clock): the step costs come from `lora_bench`, measured in the same run,
so the comparison does not hinge on the machine's drift.

- **mixed** (stepfleet): step-level continuous batching; every request joins the running
  batch at the next step boundary whatever its adapters (unmerged per-row deltas: a step
  costs what a batch of that composition — images, images with an adapter, distinct
  adapters — measured, laid out with each adapter's rows apart so the hooks gather).
- **one-state** (the peers: vLLM-Omni, SGLang): step-level batching too, but a batch holds one
  adapter state, merged into the weights (steps cost the base step). Requests are admitted in
  arrival order while they share the running batch's state; the first that does not waits
  (head of line) until the batch drains, then the weights switch to its state (unmerge +
  merge, measured).
- **merge-per-request**: one request at a time; merge its adapter, run its steps, unmerge.

A trace is seeded: Poisson arrivals, 8 adapters with Zipf popularity, a share of requests
with no adapter.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from stepfleet.serving.bench.step_replay import replay as replay_steps

NONE = ""  # the adapter state of a request without adapters


@dataclass(frozen=True)
class Costs:
    """Measured seconds: per-step by images in the batch (index 1..max_batch), and a weight switch."""

    plain: Sequence[float]  # base step (no adapters, or merged)
    mixed: Sequence[float]  # every image a different adapter, unmerged
    merge_s: float  # merge one adapter into the weights
    unmerge_s: float
    #: Measured step seconds by composition (images, images with an adapter, distinct adapters).
    by_composition: Mapping[tuple[int, int, int], float] = field(default_factory=dict)

    def step(self, images: int, lora_images: int, adapters: int | None = None) -> float:
        """One step of a batch: its measured composition when known, else the base step plus the
        adapter share of the every-image-its-own-adapter overhead (an upper bound)."""
        base = self.plain[images]
        if lora_images == 0:
            return base
        measured = self.by_composition.get((images, lora_images, adapters or lora_images))
        if measured is not None:
            return measured
        return base + (self.mixed[images] - base) * lora_images / images


@dataclass(frozen=True)
class Request:
    arrival: float
    adapter: str  # NONE or an adapter name


def trace(n: int, rate: float, adapters: int = 8, zipf_s: float = 1.1, no_adapter_share: float = 0.2,
          seed: int = 0) -> list[Request]:
    """`n` requests at `rate` per second (all at 0 when rate is inf)."""
    rnd = random.Random(seed)
    weights = [1.0 / (k + 1) ** zipf_s for k in range(adapters)]
    names = [f"lora-{k}" for k in range(adapters)]
    t, out = 0.0, []
    for _ in range(n):
        if rate != float("inf"):
            t += rnd.expovariate(rate)
        out.append(Request(t, NONE if rnd.random() < no_adapter_share else rnd.choices(names, weights)[0]))
    return out


def _batched(reqs: Sequence[Request], costs: Costs, steps: int, max_batch: int, one_state: bool) -> list[float]:
    """Latencies under step-level batching (mixed, or one adapter state per batch)."""
    def switch(merged: object, state: object) -> float:
        return (costs.unmerge_s if merged != NONE else 0.0) + (costs.merge_s if state != NONE else 0.0)

    def step(running: Sequence[Request]) -> float:
        if one_state:
            return costs.step(len(running), 0)
        named = [r.adapter for r in running if r.adapter != NONE]
        return costs.step(len(running), len(named), len(set(named)))

    return replay_steps(reqs, steps, max_batch, step, group=(lambda r: r.adapter) if one_state else None,
                        switch_cost=switch, initial_group=NONE)


def compositions(max_batch: int) -> list[tuple[int, int, int]]:
    """Every (images, images with an adapter, distinct adapters) a step of up to `max_batch` can have."""
    return [(n, m, k) for n in range(1, max_batch + 1) for m in range(1, n + 1) for k in range(1, m + 1)]


def layout(images: int, lora_images: int, adapters: int) -> list[int | None]:
    """Which adapter (0..adapters-1, None: no adapter) each image of a measured batch takes.

    Adapter images spread over the batch and adapters dealt round-robin (A, B, A, B), so an
    adapter's rows are apart whenever they can be: the hooks' gather path, the dearer one a live
    batch in arrival order usually takes.
    """
    where = {round(i * images / lora_images) for i in range(lora_images)}
    out: list[int | None] = []
    dealt = 0
    for i in range(images):
        if i in where:
            out.append(dealt % adapters)
            dealt += 1
        else:
            out.append(None)
    return out


def _one_at_a_time(reqs: Sequence[Request], costs: Costs, steps: int) -> list[float]:
    t, out = 0.0, []
    for r in sorted(reqs, key=lambda r: r.arrival):
        t = max(t, r.arrival)
        merge = costs.merge_s + costs.unmerge_s if r.adapter != NONE else 0.0
        t += merge + steps * costs.plain[1]
        out.append(t - r.arrival)
    return out


POLICIES: dict[str, Callable[[Sequence[Request], Costs, int, int], list[float]]] = {
    "mixed": lambda reqs, c, steps, mb: _batched(reqs, c, steps, mb, one_state=False),
    "one-state": lambda reqs, c, steps, mb: _batched(reqs, c, steps, mb, one_state=True),
    "merge-per-request": lambda reqs, c, steps, mb: _one_at_a_time(reqs, c, steps),
}


def saturation_throughput(policy: str, costs: Costs, steps: int, max_batch: int, n: int = 400,
                          seed: int = 0) -> float:
    """Requests per second with every request waiting from the start (the policy's ceiling)."""
    reqs = trace(n, float("inf"), seed=seed)
    latencies = POLICIES[policy](reqs, costs, steps, max_batch)
    return n / max(latencies)


def replay(costs: Costs, steps: int, max_batch: int, loads: Sequence[float] = (0.7, 0.9), n: int = 400,
           seed: int = 0) -> dict:
    """Mean and p95 latency per policy and load (load × mixed's saturation throughput), and throughputs."""
    sat = {p: saturation_throughput(p, costs, steps, max_batch, n, seed) for p in POLICIES}
    out: dict = {"saturation_rps": sat, "loads": {}}
    for load in loads:
        rate = load * sat["mixed"]
        reqs = trace(n, rate, seed=seed)
        row = {}
        for p, run in POLICIES.items():
            lat = sorted(run(reqs, costs, steps, max_batch))
            row[p] = {"mean_s": sum(lat) / len(lat), "p95_s": lat[int(0.95 * (len(lat) - 1))]}
        out["loads"][str(load)] = {"rate_rps": rate, **row}
    return out
