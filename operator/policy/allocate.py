"""Replica targets per pool for the two modes.

Cost mode fills demand cheapest-per-image first. Every pool first gets its minimum (those
replicas are paid for anyway, so their capacity counts), then the cheapest pool that meets
the SLO grows up to its maximum, then the next. The result is the cheapest fleet that
covers the planned demand, as far as whole replicas allow.

Capacity mode is entered when a pool that plan relies on cannot get capacity. It does not
simply move the shortfall to the next-cheapest pool: shortages are often correlated (a
region short of one accelerator is often short of its neighbour), so the deficit is spread
over every pool that has capacity, in proportion to what each can serve (throughput per
replica times its replica ceiling). The short pool keeps its ready replicas warm and keeps
asking for what the cost plan wanted there — the pending pods cost nothing without nodes,
and they are how the pool shows capacity again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .pools import PoolView


@dataclass(frozen=True)
class Allocation:
    replicas: Mapping[str, int]
    #: Demand (rps) the allocation could not cover within pool maxima.
    unmet_rps: float
    #: Capacity-mode split of the deficit: pool -> share (empty in cost mode).
    shares: Mapping[str, float]
    #: Demand the short pools still serve with their ready replicas (capacity mode).
    short_servable_rps: float = 0.0


def by_price(pools: Iterable[PoolView], switch_margin: float = 0.0) -> list[PoolView]:
    """Pools cheapest per image first; the name breaks ties so the order is stable.

    A pool serving above its minimum ranks as if `switch_margin` cheaper, so load moves
    only for a real saving, not for a rounding-level one.
    """
    def rank(p: PoolView) -> tuple[float, str]:
        serving = p.ready > p.min_replicas
        return p.price_per_image * (1.0 - switch_margin if serving else 1.0), p.name

    return sorted(pools, key=rank)


def cost_allocation(pools: tuple[PoolView, ...], demand_rps: float,
                    switch_margin: float = 0.0, max_pool_share: float = 1.0) -> Allocation:
    """Cheapest fleet covering `demand_rps`: minima first, then cheapest per image.

    With `max_pool_share` below 1, no pool carries more than that share of the demand in a
    first pass (diversification against losing one pool at once); whatever is left after
    it is filled cheapest-first without the cap.
    """
    replicas = {p.name: p.min_replicas for p in pools}
    remaining = demand_rps - sum(p.servable(p.min_replicas) for p in pools)
    order = by_price((p for p in pools if p.meets_slo), switch_margin)
    caps = [max(0.0, max_pool_share) * demand_rps] if max_pool_share < 1.0 else []
    for cap in [*caps, float("inf")]:
        for pool in order:
            if remaining <= 1e-9:
                break
            current = pool.servable(replicas[pool.name])
            room = cap - current
            if room <= 1e-9:
                continue
            wanted = pool.clamp(pool.replicas_for(current + min(remaining, room)))
            wanted = max(wanted, replicas[pool.name])
            replicas[pool.name] = wanted
            remaining -= pool.servable(wanted) - current
    return Allocation(replicas=replicas, unmet_rps=max(0.0, remaining), shares={})


def capacity_shares(pools: Iterable[PoolView]) -> dict[str, float]:
    """Each available pool's share of the deficit: proportional to what it can serve."""
    reach = {p.name: p.request_throughput_rps * p.max_replicas for p in pools if p.meets_slo}
    total = sum(reach.values())
    if total <= 0:
        return {}
    return {name: value / total for name, value in reach.items()}


def capacity_allocation(
    pools: tuple[PoolView, ...],
    demand_rps: float,
    short: frozenset[str],
    cost_targets: Mapping[str, int],
    bridges: frozenset[str] | None = None,
) -> Allocation:
    """Spread what the short pools cannot serve over every pool with capacity.

    With `bridges`, only those pools take the deficit (the others keep the cost plan's
    count): after a loss whose replacement is already provisioning, a pool that would be
    ready only after the replacement bridges nothing and is not asked.
    """
    replicas: dict[str, int] = {}
    short_servable = 0.0
    for pool in pools:
        if pool.name in short:
            # Keep ready replicas warm; keep asking for the cost plan's count (the probe).
            replicas[pool.name] = pool.clamp(max(pool.ready, cost_targets.get(pool.name, 0)))
            short_servable += pool.servable(pool.ready)
        elif bridges is not None and pool.name not in bridges:
            replicas[pool.name] = pool.clamp(cost_targets.get(pool.name, 0))
            short_servable += pool.servable(min(pool.ready, replicas[pool.name]))
    available = [p for p in pools if p.name not in short
                 and (bridges is None or p.name in bridges)]
    for pool in available:
        replicas[pool.name] = pool.min_replicas
    deficit = demand_rps - short_servable
    shares = capacity_shares(available)
    unmet = _water_fill(available, deficit, shares, replicas)
    return Allocation(replicas=replicas, unmet_rps=unmet, shares=shares,
                      short_servable_rps=short_servable)


def _water_fill(available: list[PoolView], deficit: float, shares: Mapping[str, float],
                replicas: dict[str, int]) -> float:
    """Split `deficit` by `shares`; a pool that hits its maximum passes the rest on."""
    active = {p.name: p for p in available if p.name in shares}
    residual = deficit
    while residual > 1e-9 and active:
        total = sum(shares[name] for name in active)
        capped = []
        for name, pool in active.items():
            rate = residual * shares[name] / total
            wanted = pool.replicas_for(rate)
            if wanted > pool.max_replicas:
                capped.append(name)
            replicas[name] = max(pool.min_replicas, min(pool.max_replicas, wanted))
        if not capped:
            return 0.0
        for name in capped:
            residual -= active.pop(name).servable(replicas[name])
    if residual > 1e-9:
        return residual
    return 0.0
