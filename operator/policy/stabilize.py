"""Scale up at once, scale down late and in steps, never break before making.

Scale-up is immediate: a replica asked for now is useful only after the provisioning delay,
so waiting costs SLO. Scale-down follows the highest recommendation of the stabilization
window (as Kubernetes' HPA does), so a dip in demand does not throw away replicas whose
model load took minutes. After the window, ready replicas go at once down to a buffer of
spare capacity above the plan (most expensive per image first); the buffer itself is
released gradually, a fraction of a pool's ready replicas per minute, so a forecast that
undershoots a steepening ramp is corrected before the capacity is gone. Replicas not yet
ready may go at once: they serve nothing. And no pool shrinks while the replicas that
would carry its load elsewhere are not ready yet: when the loop leaves capacity mode, the
spread pools keep serving until the cheap pool's new replicas are up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .model import PoolMemory
from .pools import PoolView


@dataclass(frozen=True)
class Stabilized:
    replicas: dict[str, int]
    recommendations: dict[str, tuple[tuple[float, int], ...]]
    reasons: tuple[str, ...]


def stabilize(
    pools: tuple[PoolView, ...],
    targets: Mapping[str, int],
    memories: Mapping[str, PoolMemory],
    now_s: float,
    window_s: float,
    current_rps: float,
    planned_rps: float = 0.0,
    release_fraction: float = 1.0,
    buffer: float = 0.0,
) -> Stabilized:
    """Replica counts after the three scale-down guards, and the window's history.

    `release_fraction` is the most of a pool's ready replicas one decision releases while
    the fleet's ready capacity is within `buffer` (a fraction) above `planned_rps`.
    """
    replicas: dict[str, int] = {}
    history: dict[str, tuple[tuple[float, int], ...]] = {}
    reasons: list[str] = []
    for pool in pools:
        target = pool.clamp(targets.get(pool.name, pool.min_replicas))
        memory = memories.get(pool.name) or PoolMemory(name=pool.name)
        past = memory.recommendations
        if not past and pool.desired > 0 and current_rps <= 0:
            # First decision before any demand was measured: treat what runs now as the last
            # recommendation, so a fresh loop does not drop replicas it knows nothing about.
            # With demand measured, surplus beyond the release buffer goes at once: a fleet
            # ten times too big costs more in one window than any misjudged ramp.
            past = ((now_s, pool.desired),)
        kept = tuple((t, n) for t, n in past if t > now_s - window_s) + ((now_s, target),)
        history[pool.name] = kept
        replicas[pool.name] = pool.clamp(max(n for _, n in kept))
        if replicas[pool.name] > target:
            reasons.append(f"holding scale-down of {pool.name} at {replicas[pool.name]} "
                           f"(recommended {target}) for the {window_s:.0f}s stabilization "
                           "window")

    reasons.extend(_release_gradually(pools, replicas, planned_rps * (1.0 + buffer),
                                      release_fraction))
    reasons.extend(_make_before_break(pools, replicas, current_rps))
    return Stabilized(replicas, history, tuple(reasons))


def _release_gradually(pools: tuple[PoolView, ...], replicas: dict[str, int],
                       keep_rps: float, fraction: float) -> list[str]:
    """Hold back ready replicas a full release would drop, but only down to `keep_rps` of
    ready capacity: beyond that buffer they go at once, most expensive per image first."""
    floors = {p.name: max(replicas[p.name], p.ready - max(1, math.floor(p.ready * fraction)))
              for p in pools}

    def ready_capacity(pool: PoolView, count: int) -> float:
        return pool.servable(min(pool.ready, count))

    total = sum(ready_capacity(p, floors[p.name]) for p in pools)
    reasons = []
    for pool in sorted(pools, key=lambda p: (-p.price_per_image, p.name)):
        low, high = replicas[pool.name], floors[pool.name]
        if high <= low:
            continue
        others = total - ready_capacity(pool, high)
        # The fewest replicas (>= the plan) that keep the fleet at the buffer.
        while low < high:
            mid = (low + high) // 2
            if others + ready_capacity(pool, mid) >= keep_rps:
                high = mid
            else:
                low = mid + 1
        total = others + ready_capacity(pool, high)
        if high > replicas[pool.name]:
            reasons.append(f"scaling {pool.name} down gradually: {pool.ready} ready -> "
                           f"{high} (plan {replicas[pool.name]})")
            replicas[pool.name] = pool.clamp(high)
    return reasons


def _make_before_break(pools: tuple[PoolView, ...], replicas: dict[str, int],
                       current_rps: float) -> list[str]:
    """Shrink only if the ready replicas that stay cover the current demand."""
    shrinking = [p for p in pools if replicas[p.name] < p.desired]
    if not shrinking:
        return []
    staying = sum(p.servable(min(p.ready, replicas[p.name])) for p in pools)
    if staying >= current_rps:
        return []
    reasons = []
    for pool in shrinking:
        reasons.append(f"holding {pool.name} at {pool.desired} (plan {replicas[pool.name]}): "
                       f"ready replicas elsewhere serve {staying:.1f} rps of "
                       f"{current_rps:.1f} rps demand")
        replicas[pool.name] = pool.clamp(pool.desired)
    return reasons
