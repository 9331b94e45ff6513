"""Scale up at once, scale down late, and never break before making.

Scale-up is immediate: a replica asked for now is useful only after the provisioning delay,
so waiting costs SLO. Scale-down follows the highest recommendation of the stabilization
window (as Kubernetes' HPA does), so a dip in demand does not throw away replicas whose
model load took minutes. And no pool shrinks while the replicas that would carry its load
elsewhere are not ready yet: when the loop leaves capacity mode, the spread pools keep
serving until the cheap pool's new replicas are up.
"""

from __future__ import annotations

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
) -> Stabilized:
    replicas: dict[str, int] = {}
    history: dict[str, tuple[tuple[float, int], ...]] = {}
    reasons: list[str] = []
    for pool in pools:
        target = pool.clamp(targets.get(pool.name, pool.min_replicas))
        memory = memories.get(pool.name) or PoolMemory(name=pool.name)
        past = memory.recommendations
        if not past and pool.desired > 0:
            # First decision for this pool: treat what runs now as the last recommendation,
            # so a freshly started loop does not drop replicas before it has measured demand.
            past = ((now_s, pool.desired),)
        kept = tuple((t, n) for t, n in past if t > now_s - window_s) + ((now_s, target),)
        history[pool.name] = kept
        chosen = pool.clamp(max(n for _, n in kept))
        if chosen > target:
            reasons.append(f"holding scale-down of {pool.name} at {chosen} (recommended "
                           f"{target}) for the {window_s:.0f}s stabilization window")
        replicas[pool.name] = chosen

    # Make before break: shrink only if the ready replicas that stay cover current demand.
    shrinking = [p for p in pools if replicas[p.name] < p.desired]
    if shrinking:
        staying = sum(p.servable(min(p.ready, replicas[p.name])) for p in pools)
        if staying < current_rps:
            for pool in shrinking:
                reasons.append(f"holding {pool.name} at {pool.desired} (plan {replicas[pool.name]}"
                               f"): ready replicas elsewhere serve {staying:.1f} rps of "
                               f"{current_rps:.1f} rps demand")
                replicas[pool.name] = pool.clamp(pool.desired)
    return Stabilized(replicas, history, tuple(reasons))
