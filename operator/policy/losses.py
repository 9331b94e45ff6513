"""Losses of ready capacity, and provisioning times learned per pool.

A pool can stop serving without any scheduler saying so: a zone outage, a mass spot
interruption, pods stuck not-ready after a node problem. Karpenter reports nothing (its
nodes were launched), no pod is Unschedulable, yet the replicas the plan relies on are
gone. So the policy watches the one number that matters — ready replicas — against what
was ready *and* planned at the last decision: a fall of more than `loss_fraction` is a
capacity signal like Karpenter's, whatever caused it, and is acted on in the same decision
(the kopf timer, `stepfleet up` and the simulator all see it within one interval). The pool
counts as lost until its ready replicas are back near what it had (or what the plan now
wants there, if that is less).

Each loss also stamps the pool's `last_loss_s`: the hedge (`hedge`) keeps a domain that has
lost ready capacity once hedged for a while, as SpotHedge avoids a zone that was just
preempted. A capacity shortage does not: replicas that run keep running, and capacity mode
already spreads what cannot be placed.

Provisioning times are measured, not assumed: from the decision that first saw a pool's
replicas wanted but not ready to the decision that sees them ready. The measurement is an
exponentially weighted mean seeded by the declared time; time spent short of capacity is
not a provisioning time and is not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .model import PoolMemory
from .pools import PoolView


@dataclass(frozen=True)
class LossTrack:
    memories: dict[str, PoolMemory]
    #: Pools that have lost ready capacity and not regained it: pool -> since when.
    lost: dict[str, float]
    #: Pools whose loss was first seen now.
    newly: tuple[str, ...]
    reasons: tuple[str, ...]


def track_losses(pools: tuple[PoolView, ...], memories: Mapping[str, PoolMemory],
                 now_s: float, loss_fraction: float) -> LossTrack:
    """Update each pool's loss memory from its ready replicas; see the module docstring."""
    out: dict[str, PoolMemory] = {}
    lost: dict[str, float] = {}
    newly: list[str] = []
    reasons: list[str] = []
    frac = min(max(loss_fraction, 0.0), 1.0)
    for pool in pools:
        memory = memories.get(pool.name) or PoolMemory(name=pool.name)
        if memory.lost_since is None:
            expected = _expected(memory)
            gone = expected - pool.ready
            if expected > 0 and gone >= max(1, math.ceil(frac * expected)):
                memory = replace(memory, lost_since=now_s, lost_expected=expected,
                                 last_loss_s=now_s)
                newly.append(pool.name)
                reasons.append(f"{pool.name} lost ready capacity: {pool.ready} ready of "
                               f"{expected} at the last decision; a capacity signal")
        else:
            target = min(memory.lost_expected, max(pool.desired, 0))
            if pool.ready >= math.ceil((1.0 - frac) * target - 1e-9):
                reasons.append(f"{pool.name} regained its ready capacity ({pool.ready} ready)")
                memory = replace(memory, lost_since=None, lost_expected=0)
            else:
                memory = replace(memory, last_loss_s=now_s)
        if memory.lost_since is not None:
            lost[pool.name] = memory.lost_since
        out[pool.name] = memory
    return LossTrack(out, lost, tuple(newly), tuple(reasons))


def _expected(memory: PoolMemory) -> int:
    """Ready replicas the pool should still have: what was ready and still planned."""
    if memory.ready is None or memory.desired is None:
        return 0
    return min(memory.ready, memory.desired)


def learn_provisioning(pool: PoolView, memory: PoolMemory, now_s: float,
                       weight: float) -> PoolMemory:
    """Measure how long the replicas asked for at `asked_since` took to be ready."""
    if pool.short_since is not None:
        return replace(memory, asked_since=None, asked_target=0)  # waiting for capacity
    if memory.asked_since is not None and pool.ready >= min(memory.asked_target, pool.desired):
        measured = now_s - memory.asked_since
        learned = (measured if memory.provision_s is None
                   else (1.0 - weight) * memory.provision_s + weight * measured)
        memory = replace(memory, provision_s=learned, asked_since=None, asked_target=0)
    return memory


def note_asked(memory: PoolMemory, planned: int, asked: int, now_s: float) -> PoolMemory:
    """Start a provisioning measurement when a plan asks for replicas beyond those already
    asked for (`asked`: the Deployment's count); replicas asked earlier would be ready
    sooner and make the measurement too short."""
    if memory.asked_since is None and planned > asked:
        return replace(memory, asked_since=now_s, asked_target=planned)
    return memory
