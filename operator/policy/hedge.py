"""Hedging: keep enough ready capacity outside each failure domain to survive its loss.

The cost plan puts demand on the pool cheapest per image — all of it, when that pool is
big enough. That is the cheapest fleet until the pool is lost: then nothing serves until
replacements load (minutes), and every request in between misses the SLO. A failure
domain is what fails together (a spot market, a zone, an instance family: pools sharing
`failure_domain`). For each domain `D` with a hedge fraction `f_D`, the plan keeps

    servable(ready replicas outside D)  >=  f_D * demand planned over D's replacement time

where the replacement time is one interval plus the (learned) provisioning time of D's
pools: survivors must carry the demand until D is back, including its growth meanwhile.

The fraction is a risk setting (`ControlSettings.hedge_*`): spot domains are hedged by
default (SkyServe's SpotHedge keeps on-demand fallback for spot), on-demand domains once
they have failed, for `loss_memory_s`. A full hedge is expensive — with survivors able to
carry the whole demand the fleet roughly doubles — which is why it is not the default for
on-demand pools; docs/simulator.md measures what it buys and costs.

Meeting the constraints at the least cost is a small covering problem. Whole replicas and
the queueing model make it non-linear, so a few candidate fleets are built and the cheapest
feasible one wins: the cost plan repaired greedily (each violated domain's deficit on the
cheapest pool outside it), the hedge placed first and the rest of the demand filled cheapest
first on top of it (the hedge serves too), the plan that avoids a hedged domain altogether (survivors alone
carry the demand, so the domain's own capacity would be redundant), and an even spread of
`R / (k - 1)` over the `k` cheapest domains for every `k` (any one lost, the other `k - 1`
still carry `R`: N+1 over domains, SpotHedge's spreading).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from .allocate import cost_allocation
from .model import ControlSettings, PoolMemory
from .pools import PoolView


@dataclass(frozen=True)
class Hedge:
    replicas: dict[str, int]
    reasons: tuple[str, ...]


def domains(pools: tuple[PoolView, ...]) -> dict[str, tuple[PoolView, ...]]:
    out: dict[str, list[PoolView]] = {}
    for pool in pools:
        out.setdefault(pool.domain or pool.name, []).append(pool)
    return {name: tuple(members) for name, members in out.items()}


def hedge_fractions(pools: tuple[PoolView, ...], memories: Mapping[str, PoolMemory],
                    now_s: float, control: ControlSettings) -> dict[str, float]:
    """Each domain's hedge fraction: by capacity type, raised after a recent loss."""
    out: dict[str, float] = {}
    for name, members in domains(pools).items():
        spot = any(p.capacity_type == "spot" for p in members)
        fraction = control.hedge_spot if spot else control.hedge_on_demand
        for p in members:
            last = (memories.get(p.name) or PoolMemory(name=p.name)).last_loss_s
            if last is not None and now_s - last < control.loss_memory_s:
                fraction = max(fraction, control.hedge_after_loss)
        out[name] = max(0.0, min(1.0, fraction))
    return out


def replacement_s(members: tuple[PoolView, ...], interval_s: float) -> float:
    """Seconds until a lost domain serves again: one interval to notice, then provisioning."""
    return interval_s + max((p.provision_s for p in members), default=0.0)


def hedge(
    pools: tuple[PoolView, ...],
    base: Mapping[str, int],
    fractions: Mapping[str, float],
    hold_rps: Callable[[float], float],
    demand_rps: float,
    interval_s: float,
    switch_margin: float = 0.0,
) -> Hedge:
    """The cheapest replicas (at least `base`) meeting every domain's hedge constraint.

    `hold_rps(lookahead_s)` is the demand to plan for that far ahead; `demand_rps` the cost
    plan's demand (candidates that avoid a domain must still cover it).
    """
    groups = domains(pools)
    needs = {d: fractions.get(d, 0.0) * hold_rps(replacement_s(members, interval_s))
             for d, members in groups.items() if fractions.get(d, 0.0) > 0}
    needs = {d: r for d, r in needs.items() if r > 1e-9}
    start = {p.name: p.clamp(base.get(p.name, p.min_replicas)) for p in pools}
    if not needs or len(groups) < 2 or not _violations(pools, start, needs):
        return Hedge(start, ())

    candidates = [_repair(pools, start, needs)]
    # Hedge first, then fill: the hedge replicas serve too, so the cheap pools need less.
    minima = {p.name: p.min_replicas for p in pools}
    floors = _repair(pools, minima, needs)
    raised = tuple(replace(p, min_replicas=max(p.min_replicas, floors[p.name])) for p in pools)
    candidates.append(_repair(pools, dict(cost_allocation(raised, demand_rps, switch_margin).replicas),
                              needs))
    for d in needs:  # avoid the hedged domain: the rest carry the demand on their own
        without = tuple(replace(p, max_replicas=p.min_replicas) if p.domain == d else p
                        for p in pools)
        avoided = cost_allocation(without, demand_rps, switch_margin).replicas
        candidates.append(_repair(pools, _at_least(avoided, start, pools, d), needs))
    top = max(needs.values())
    ranked = sorted(groups, key=lambda d: min((p.price_per_image for p in groups[d]
                                               if p.meets_slo), default=math.inf))
    for k in range(2, len(ranked) + 1):
        spread = dict(start)
        for d in ranked[:k]:
            _fill(groups[d], spread, top / (k - 1))
        candidates.append(_repair(pools, spread, needs))
    feasible = [c for c in candidates if not _violations(pools, c, needs)]
    best = min(feasible or candidates, key=lambda c: (_cost(pools, c), sorted(c.items())))
    return Hedge(best, _reasons(pools, start, best, needs, groups, interval_s))


def _at_least(replicas: Mapping[str, int], start: Mapping[str, int],
              pools: tuple[PoolView, ...], avoided: str) -> dict[str, int]:
    """The avoiding plan, keeping every pool's minimum (the avoided domain's at its minimum)."""
    return {p.name: (p.min_replicas if p.domain == avoided else max(replicas[p.name], p.min_replicas))
            for p in pools}


def _outside(pools: tuple[PoolView, ...], replicas: Mapping[str, int], domain: str) -> float:
    return sum(p.servable(replicas[p.name]) for p in pools if p.domain != domain)


def _violations(pools: tuple[PoolView, ...], replicas: Mapping[str, int],
                needs: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for d, need in needs.items():
        deficit = need - _outside(pools, replicas, d)
        if deficit > 1e-6:
            out[d] = deficit
    return out


def _repair(pools: tuple[PoolView, ...], replicas: Mapping[str, int],
            needs: Mapping[str, float]) -> dict[str, int]:
    """Cover each violated domain's deficit on the cheapest pools outside it."""
    out = dict(replicas)
    for _ in range(2 * len(needs) + 2):
        violated = _violations(pools, out, needs)
        if not violated:
            break
        domain, deficit = max(violated.items(), key=lambda kv: kv[1])
        for pool in sorted((p for p in pools if p.domain != domain and p.meets_slo),
                           key=lambda p: (p.price_per_image, p.name)):
            if deficit <= 1e-6:
                break
            current = pool.servable(out[pool.name])
            wanted = pool.clamp(pool.replicas_for(current + deficit))
            if wanted > out[pool.name]:
                out[pool.name] = wanted
                deficit -= pool.servable(wanted) - current
    return out


def _fill(members: tuple[PoolView, ...], replicas: dict[str, int], target_rps: float) -> None:
    """Raise a domain's pools, cheapest per image first, until they serve `target_rps`."""
    have = sum(p.servable(replicas[p.name]) for p in members)
    for pool in sorted((p for p in members if p.meets_slo), key=lambda p: (p.price_per_image, p.name)):
        if have >= target_rps - 1e-9:
            return
        current = pool.servable(replicas[pool.name])
        wanted = max(replicas[pool.name], pool.clamp(pool.replicas_for(current + target_rps - have)))
        have += pool.servable(wanted) - current
        replicas[pool.name] = wanted


def _cost(pools: tuple[PoolView, ...], replicas: Mapping[str, int]) -> float:
    return sum(replicas[p.name] * p.price_per_hour for p in pools)


def _reasons(pools: tuple[PoolView, ...], start: Mapping[str, int], best: Mapping[str, int],
             needs: Mapping[str, float], groups: Mapping[str, tuple[PoolView, ...]],
             interval_s: float) -> tuple[str, ...]:
    hedged = ", ".join(
        f"{d} ({needs[d]:.1f} rps outside it, {replacement_s(groups[d], interval_s) / 60:.0f} min "
        "to replace)" for d in sorted(needs))
    out = [f"hedging failure domains: {hedged}"]
    for pool in pools:
        extra = best[pool.name] - start[pool.name]
        if extra == 0:
            continue
        covers = [d for d in sorted(needs) if d != pool.domain]
        if extra > 0:
            out.append(f"keeping {best[pool.name]} replicas of {pool.name} (+{extra}) as a hedge for "
                       + ", ".join(f"{d}: {replacement_s(groups[d], interval_s) / 60:.0f} min to replace"
                                   for d in covers))
        else:
            out.append(f"moving {-extra} replicas off {pool.name} ({best[pool.name]} left): its domain "
                       f"{pool.domain} is hedged, so capacity outside it must carry the demand anyway")
    cost = _cost(pools, best) - _cost(pools, start)
    out.append(f"the hedge costs ${cost:+.2f}/h over the cost plan")
    return tuple(out)
