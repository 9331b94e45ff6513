"""Seeded open-loop request traces and the latency statistics every benchmark reports."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

STEP_MIX: tuple[int, ...] = (10, 20, 30)
SCHEDULER_MIX: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m")


@dataclass(frozen=True)
class TraceRequest:
    id: str
    arrival_s: float
    steps: int
    scheduler: str
    seed: int
    prompt: str


def poisson_trace(
    rate_rps: float,
    count: int,
    seed: int,
    steps: Sequence[int] = STEP_MIX,
    schedulers: Sequence[str] = SCHEDULER_MIX,
) -> list[TraceRequest]:
    """`count` requests with exponential inter-arrival gaps; steps and schedulers drawn uniformly."""
    rng = random.Random(seed)
    t = 0.0
    out: list[TraceRequest] = []
    for i in range(count):
        if i:
            t += rng.expovariate(rate_rps)
        out.append(
            TraceRequest(
                id=f"r{i:04d}",
                arrival_s=t,
                steps=rng.choice(list(steps)),
                scheduler=rng.choice(list(schedulers)),
                seed=rng.randrange(2**31),
                prompt=f"a picture of request {i}",
            )
        )
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); the definition Prometheus users expect from summaries."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def live_stats(arrivals: Sequence[float], finishes: Sequence[float]) -> dict[str, object]:
    """`latency_stats` of a live run, with its span and every latency kept (`pooled_stats` combines runs)."""
    return {**latency_stats(arrivals, finishes), "span_s": max(finishes) - min(arrivals),
            "latencies_s": [f - a for a, f in zip(arrivals, finishes, strict=True)]}


def pooled_stats(runs: Sequence[dict]) -> dict[str, object]:
    """Several live runs of one policy as one: latencies pooled, throughput = all completed / summed spans.

    Why: a live comparison runs policies one after another, so a minute in which the machine is
    slower lands on one of them; running the pair twice in opposite orders (A B, then B A) and
    pooling cancels a steady drift and doubles the samples the p95 is read from.
    """
    lat = [x for r in runs for x in r["latencies_s"]]
    span = sum(r["span_s"] for r in runs)
    return {**_stats(lat, span), "rounds": len(runs), "latencies_s": lat, "span_s": span,
            "round_spread": round_spread(runs)}


def round_spread(runs: Sequence[dict]) -> dict[str, float]:
    """How far one server's rounds on the same trace moved apart: largest / smallest mean and p95.

    Why: the rounds replay the identical trace on the identical server, so their difference is
    the machine's drift alone. A ratio between two servers that lies within this spread is a
    statement about the minute it ran in, not about the servers (session 11: the same server's
    p95 moved by 1.2x in the median pair of rounds, and by up to 2x beside the noise).
    """
    means = [r["mean_s"] for r in runs]
    p95s = [r["p95_s"] for r in runs]
    return {"mean": max(means) / min(means), "p95": max(p95s) / min(p95s)}


def latency_stats(arrivals: Sequence[float], finishes: Sequence[float]) -> dict[str, float]:
    """Throughput over the whole run (first arrival to last completion) and latency figures."""
    return _stats([f - a for a, f in zip(arrivals, finishes, strict=True)], max(finishes) - min(arrivals))


def _stats(lat: Sequence[float], span: float) -> dict[str, float]:
    return {
        "throughput_rps": len(lat) / span if span > 0 else math.nan,
        "mean_s": sum(lat) / len(lat),
        "p50_s": percentile(lat, 0.50),
        "p95_s": percentile(lat, 0.95),
        "completed": len(lat),
    }
