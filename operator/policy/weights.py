"""Router weights: each pool's share of new requests.

Weights follow what each pool can serve right now — its ready replicas at the utilization
the SLO allows, minus what it needs to work off its queue within one interval — so every
pool runs equally close to its limit and none gets traffic it cannot serve. Replicas that
are still loading get nothing. Cost is decided by the replica counts; the weights only
spread load over what is already paid for, so the cheap pools carry most of it in cost mode
because the cost plan put most replicas there.
"""

from __future__ import annotations

from collections.abc import Mapping

from .pools import PoolView


def route_weights(pools: tuple[PoolView, ...], replicas: Mapping[str, int],
                  interval_s: float) -> dict[str, float]:
    """Shares summing to 1 over pools with ready replicas (all zero if none has any).

    A pool the plan scales down counts only the ready replicas it keeps (`replicas`), so
    traffic moves off before its replicas leave.
    """
    kept = {p.name: min(p.ready, replicas.get(p.name, p.ready)) for p in pools}
    servable = {
        p.name: max(0.0, p.servable(kept[p.name]) - p.queue_depth / max(interval_s, 1e-9))
        for p in pools if kept[p.name] > 0
    }
    if sum(servable.values()) <= 0:
        # Every queue is backed up (or no pool meets the SLO): spread by raw throughput.
        servable = {p.name: kept[p.name] * p.request_throughput_rps for p in pools if kept[p.name] > 0}
    total = sum(servable.values())
    if total <= 0:
        return {p.name: 0.0 for p in pools}
    return {p.name: servable.get(p.name, 0.0) / total for p in pools}
