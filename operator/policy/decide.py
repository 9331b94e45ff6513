"""`decide(observation, state, spec) -> (plan, state)`: one step of the control loop.

A purely computational function with no side effects: no Kubernetes, no clock (the time is
in the observation), no randomness. The kopf timer, the local fleet runner and the
simulator all call it (through `step.control_step`), so the simulator's figures are the
operator's behaviour.

Steps, each in its own module:
  1. resolve pools: spec limits merged with what was observed and the provisioning times
     learned so far (`pools`, `losses`), and what a request of the current mix of images
     and videos costs each pool in device time (`kinds`);
  2. losses: a pool whose ready replicas fell far below what was ready and planned is
     short, like one Karpenter cannot place (`losses`);
  3. plan demand: the current rate raised along its trend for one provisioning delay plus
     one interval, plus headroom (`demand`);
  4. the cost plan: cheapest per image first (`allocate`), then hedged: enough ready
     capacity outside each hedged failure domain to carry the demand through its loss
     (`hedge`);
  5. the mode: capacity while a pool that plan relies on is short, back after recovery and
     dwell (`modes`); in capacity mode, the deficit is spread over pools with capacity
     (after a loss, over those that are ready before the lost pool's replacement);
  6. stabilize: up at once, down after the window, never break before making (`stabilize`);
  7. weights from what ready replicas can serve (`weights`); NodePool limits with surge.
Every step adds the reasons a human reads in `status`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from .allocate import Allocation, by_price, capacity_allocation, cost_allocation
from .demand import planning_rate
from .hedge import hedge, hedge_fractions
from .losses import learn_provisioning, note_asked, track_losses
from .model import (
    Observation,
    Plan,
    PolicySpec,
    PolicyState,
    PoolMemory,
    PoolObservation,
    PoolPlan,
)
from .modes import choose_mode, track_shortages
from .pools import PoolView, resolve
from .stabilize import stabilize
from .weights import route_weights


def decide(observation: Observation, state: PolicyState,
           spec: PolicySpec) -> tuple[Plan, PolicyState]:
    """The plan for now and the state to pass to the next call (start with PolicyState())."""
    control = spec.control
    now = observation.now_s
    learned = {m.name: m.provision_s for m in state.pools if m.provision_s is not None}
    observed = resolve(spec, observation, learned)
    losses = track_losses(observed, {m.name: m for m in state.pools}, now, control.loss_fraction)
    # A loss of ready capacity is a shortage like any other from here on.
    pools = tuple(_short_from_loss(p, losses.lost.get(p.name)) for p in observed)
    state = replace(state, pools=tuple(losses.memories.values()))
    lookahead = control.interval_s + max((p.provision_s for p in pools), default=0.0)
    rate = max(0.0, observation.arrival_rps)
    trend = observation.arrival_trend_rps_per_s

    cost_rps = planning_rate(rate, trend, lookahead, control.headroom)
    cost = cost_allocation(pools, cost_rps, control.switch_margin, control.max_pool_share)
    memories = track_shortages(state, pools, now)
    fractions = hedge_fractions(pools, memories, now, control)
    hedged = hedge(pools, cost.replicas, fractions,
                   lambda ahead: planning_rate(rate, trend, ahead, control.headroom),
                   cost_rps, control.interval_s, control.switch_margin)
    # The mode follows what the unhedged plan relies on: moving load off a short pool onto
    # the hedge is exactly what capacity mode does.
    mode = choose_mode(spec.mode, state, memories, pools, cost.replicas, now, control)
    cost = replace(cost, replicas=hedged.replicas)

    reasons = [_demand_reason(rate, trend, lookahead), *_kind_reasons(pools, rate), *losses.reasons]
    if mode.mode == "cost":
        planned_rps = cost_rps
        allocation = cost
        reasons.extend(mode.reasons)
        reasons.append(_cost_reason(pools, cost, planned_rps, control.headroom,
                                    control.switch_margin))
        reasons.extend(hedged.reasons)
    else:
        planned_rps = planning_rate(rate, trend, lookahead, control.capacity_headroom)
        bridges = _bridges(pools, mode.short, losses.lost, observation.pools, now)
        allocation = capacity_allocation(pools, planned_rps, mode.short, cost.replicas, bridges)
        reasons.extend(mode.reasons)
        reasons.append(_capacity_reason(pools, allocation, mode.short, planned_rps,
                                        control.capacity_headroom))
        if bridges is not None:
            reasons.append("bridging the loss on pools ready before its replacement: "
                           + (", ".join(sorted(bridges)) or "none is"))

    release = min(1.0, control.scale_down_per_min * control.interval_s / 60.0)
    stable = stabilize(pools, allocation.replicas, memories, now, control.stabilization_s,
                       rate, planned_rps, release, control.scale_down_buffer)
    reasons.extend(stable.reasons)
    replicas = dict(stable.replicas)
    if mode.mode == "capacity":
        for pool in pools:  # keep the short pools' ready replicas warm, whatever the window
            if pool.name in mode.short:
                replicas[pool.name] = max(replicas[pool.name], pool.clamp(pool.ready))

    weights = route_weights(pools, replicas, control.interval_s)
    reasons.append(_weights_reason(weights))
    reasons.extend(_latency_reasons(pools, spec.slo.percentile))
    short = {p.name: p.short_since for p in pools if p.short_since is not None}
    plan = Plan(
        mode=mode.mode,
        pools=tuple(
            PoolPlan(name=p.name, replicas=replicas[p.name], weight=weights[p.name],
                     nodepool_limit=_nodepool_limit(p, replicas[p.name], control.nodepool_surge),
                     cost_per_hour=replicas[p.name] * p.price_per_hour)
            for p in pools),
        reasons=tuple(reasons),
        mode_changed=mode.changed,
        planned_rps=planned_rps,
        short=tuple(sorted(short.items())),
        newly_lost=losses.newly,
    )
    new_state = PolicyState(
        mode=mode.mode,
        mode_since_s=mode.since_s,
        pools=tuple(
            _remember(memories[p.name], p, p.name in mode.forget, stable.recommendations[p.name],
                      replicas[p.name], weights[p.name], now, control.provision_learning)
            for p in pools),
    )
    return plan, new_state


def _short_from_loss(pool: PoolView, lost_since: float | None) -> PoolView:
    if lost_since is None:
        return pool
    since = lost_since if pool.short_since is None else min(pool.short_since, lost_since)
    return replace(pool, short_since=since)


def _bridges(pools: tuple[PoolView, ...], short: frozenset[str], lost: Mapping[str, float],
             observed: tuple[PoolObservation, ...], now_s: float) -> frozenset[str] | None:
    """After losses only (no pool short of capacity as such), the pools worth asking: those
    whose replicas are ready before the lost pools' replacements. None: spread over all."""
    signalled = {o.name for o in observed if o.capacity_short_since is not None}
    if not short or any(name not in lost or name in signalled for name in short):
        return None
    back = max(lost[p.name] + p.provision_s for p in pools if p.name in short)
    return frozenset(p.name for p in pools
                     if p.name not in short and now_s + p.provision_s < back)


def _remember(memory: PoolMemory, pool: PoolView, forget: bool,
              recommendations: tuple[tuple[float, int], ...], desired: int, weight: float,
              now_s: float, learning: float) -> PoolMemory:
    if forget:
        memory = replace(memory, short_since=None, recovered_since=None)
    memory = learn_provisioning(pool, memory, now_s, learning)
    memory = note_asked(memory, desired, max(pool.desired, pool.ready), now_s)
    return replace(memory, recommendations=recommendations, desired=desired, ready=pool.ready,
                   weight=weight)


def _nodepool_limit(pool: PoolView, replicas: int, surge: float) -> int:
    """Replicas the pool's NodePool may hold: the plan plus a rolling-update surge."""
    if replicas <= 0:
        return 0
    extra = max(1, math.ceil(replicas * surge))
    return max(replicas, min(pool.max_replicas, replicas + extra))


def _demand_reason(rate: float, trend: float, lookahead: float) -> str:
    return (f"demand {rate:.2f} rps, trend {trend:+.4f} rps/s; planning {lookahead:.0f}s "
            "ahead (provisioning delay + interval)")


def _kind_reasons(pools: tuple[PoolView, ...], rate: float) -> list[str]:
    """With video traffic: how the demand splits and what a request of the mix costs per pool."""
    share = pools[0].video_share if pools else 0.0
    if share <= 0:
        return []
    costs = ", ".join(f"{p.name} {p.units_per_request:.2f}" for p in pools)
    return [f"demand mix: {rate * (1 - share):.2f} images/s and {rate * share:.3f} videos/s "
            f"({share:.1%} videos); image-equivalents per request: {costs}"]


def _cost_reason(pools: tuple[PoolView, ...], allocation: Allocation, planned: float,
                 headroom: float, switch_margin: float) -> str:
    parts = []
    for pool in by_price(pools, switch_margin):
        n = allocation.replicas[pool.name]
        note = "" if pool.meets_slo else ", cannot meet the SLO"
        parts.append(f"{pool.name} {n} (${pool.price_per_image * 1000:.3f}/1k images{note})")
    text = (f"cost mode: {planned:.2f} rps planned (+{headroom:.0%} headroom), cheapest per "
            "image first: " + ", ".join(parts))
    if allocation.unmet_rps > 0:
        text += f"; {allocation.unmet_rps:.2f} rps exceed every pool's maximum"
    return text


def _capacity_reason(pools: tuple[PoolView, ...], allocation: Allocation,
                     short: frozenset[str], planned: float, headroom: float) -> str:
    deficit = planned - allocation.short_servable_rps
    spread = ", ".join(f"{name} {share:.0%} -> {allocation.replicas[name]}"
                       for name, share in sorted(allocation.shares.items()))
    warm = ", ".join(f"{p.name} keeps {p.ready} ready and asks for "
                     f"{allocation.replicas[p.name]}" for p in pools if p.name in short)
    text = (f"capacity mode: {planned:.2f} rps planned (+{headroom:.0%} headroom); "
            f"{deficit:.2f} rps spread over pools with capacity in proportion to what each "
            f"can serve: {spread or 'none available'}")
    if warm:
        text += f"; {warm}"
    if allocation.unmet_rps > 0:
        text += f"; {allocation.unmet_rps:.2f} rps exceed every available pool's maximum"
    return text


def _weights_reason(weights: dict[str, float]) -> str:
    if not any(weights.values()):
        return "weights: no pool has a ready replica; the router has nowhere to send requests"
    shown = ", ".join(f"{name} {w:.2f}" for name, w in weights.items())
    return f"weights by what ready replicas can serve: {shown}"


def _latency_reasons(pools: tuple[PoolView, ...], percentile: float) -> list[str]:
    """Pools whose measured latency broke the SLO over the last interval."""
    return [f"{p.name} measured p{percentile * 100:g} latency {p.measured_latency_s:.2f}s "
            f"over the {p.slo_latency_s:.2f}s target ({p.ready} ready, queue "
            f"{p.queue_depth:.0f})"
            for p in pools
            if p.measured_latency_s is not None and p.measured_latency_s > p.slo_latency_s]
