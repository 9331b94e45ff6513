"""A discrete-event replay of ControlNet traffic: stepfleet's mixed step batches vs same-set batches.

Pure (no torch, no clock): the step costs come from `controlnet_bench`, measured in the same run,
so the comparison does not hinge on the machine's drift (TOOLING.md: ±10-15 % minute to minute).

- **mixed** (stepfleet): step-level continuous batching; every request joins the running batch at
  the next step boundary whatever its ControlNets; a step costs the UNet on every row plus each
  net once, on its own rows (`ControlNetExtension`).
- **same-set** (the baseline the issue names: a server that batches only requests with the same
  ControlNet set): step-level batching too, but a batch holds one ControlNet set. Requests are
  admitted in arrival order while they share the running batch's set; the first that does not
  waits (head of line) until the batch drains, then the batch takes its set.

A trace is seeded: Poisson arrivals; half the requests carry no ControlNet, the other half one of
two nets, equally often (the issue's trace).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from stepfleet.serving.bench.step_replay import replay as replay_steps

NETS: tuple[str, ...] = ("A", "B")


@dataclass(frozen=True)
class Costs:
    """Measured seconds per step, indexed by images (0..max_batch): the UNet step of a batch without
    control, and one ControlNet's run on that many images' rows."""

    plain: Sequence[float]
    net: Sequence[float]

    def step(self, images: int, by_net: Mapping[str, int]) -> float:
        return self.plain[images] + sum(self.net[k] for k in by_net.values() if k)


@dataclass(frozen=True)
class Request:
    arrival: float
    controls: tuple[str, ...]  # the ControlNet set, () for none


def trace(n: int, rate: float, control_share: float = 0.5, seed: int = 0) -> list[Request]:
    """`n` requests at `rate` per second (all at 0 when rate is inf)."""
    rnd = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate != float("inf"):
            t += rnd.expovariate(rate)
        controls = (rnd.choice(NETS),) if rnd.random() < control_share else ()
        out.append(Request(t, controls))
    return out


def _batched(reqs: Sequence[Request], costs: Costs, steps: int, max_batch: int, same_set: bool) -> list[float]:
    return replay_steps(reqs, steps, max_batch, lambda running: costs.step(
        len(running), Counter(name for r in running for name in r.controls)),
        group=(lambda r: r.controls) if same_set else None)


POLICIES: dict[str, Callable[[Sequence[Request], Costs, int, int], list[float]]] = {
    "mixed": lambda reqs, c, steps, mb: _batched(reqs, c, steps, mb, same_set=False),
    "same-set": lambda reqs, c, steps, mb: _batched(reqs, c, steps, mb, same_set=True),
}


def saturation_throughput(policy: str, costs: Costs, steps: int, max_batch: int, n: int = 400,
                          seed: int = 0) -> float:
    """Requests per second with every request waiting from the start (the policy's ceiling)."""
    latencies = POLICIES[policy](trace(n, float("inf"), seed=seed), costs, steps, max_batch)
    return n / max(latencies)


def replay(costs: Costs, steps: int, max_batch: int, loads: Sequence[float] = (0.7, 0.9), n: int = 400,
           seeds: Sequence[int] = (0,)) -> dict:
    """Mean and p95 latency per policy and load (load × mixed's saturation throughput), over `seeds`."""
    sat = {p: saturation_throughput(p, costs, steps, max_batch, n, seeds[0]) for p in POLICIES}
    out: dict = {"saturation_rps": sat, "loads": {}}
    for load in loads:
        rate = load * sat["mixed"]
        row: dict = {}
        for p, run in POLICIES.items():
            lat = sorted(x for seed in seeds for x in run(trace(n, rate, seed=seed), costs, steps, max_batch))
            row[p] = {"mean_s": sum(lat) / len(lat), "p95_s": lat[int(0.95 * (len(lat) - 1))]}
        row["mean_ratio"] = row["mixed"]["mean_s"] / row["same-set"]["mean_s"]
        out["loads"][str(load)] = {"rate_rps": rate, **row}
    return out
