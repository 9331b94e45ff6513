"""Builders shared by the policy and simulator tests: the paper's four pools, observations."""

from __future__ import annotations

from dataclasses import replace

from stepfleet.operator.policy import (
    ControlSettings,
    Observation,
    PolicySpec,
    PoolObservation,
    PoolSpec,
    SloSpec,
)

# Price per hour, throughput per replica, latency and provisioning of the paper's units.
PAPER_POOLS = (
    PoolSpec("inf2", 0.7582, 1.75, 0.67, provision_s=600, min_replicas=1, max_replicas=200),
    PoolSpec("trn1", 1.3438, 2.1667, 0.51, provision_s=600, min_replicas=1, max_replicas=200),
    PoolSpec("a10g", 1.006, 1.5, 0.68, provision_s=480, min_replicas=1, max_replicas=200),
    PoolSpec("l4", 0.8048, 1.0167, 0.96, provision_s=480, min_replicas=1, max_replicas=200),
)


def paper_spec(**control: float) -> PolicySpec:
    return PolicySpec(slo=SloSpec(latency_s=3.0, percentile=0.95), pools=PAPER_POOLS,
                      control=ControlSettings(**control))


def steady(spec: PolicySpec, now: float, rps: float, ready: dict[str, int] | None = None,
           trend: float = 0.0, short: dict[str, float] | None = None,
           pending: dict[str, int] | None = None, desired: dict[str, int] | None = None,
           prices: dict[str, float] | None = None) -> Observation:
    """An observation where every pool runs `ready` replicas (default: its minimum)."""
    ready = ready or {}
    pools = []
    for p in spec.pools:
        n_ready = ready.get(p.name, p.min_replicas)
        n_pending = (pending or {}).get(p.name, 0)
        pools.append(PoolObservation(
            name=p.name,
            desired_replicas=(desired or {}).get(p.name, n_ready + n_pending),
            ready_replicas=n_ready,
            pending_replicas=n_pending,
            price_per_hour=(prices or {}).get(p.name),
            capacity_short_since=(short or {}).get(p.name),
        ))
    return Observation(now_s=now, arrival_rps=rps, arrival_trend_rps_per_s=trend,
                       pools=tuple(pools))


def with_pool(obs: Observation, name: str, **changes: object) -> Observation:
    return replace(obs, pools=tuple(replace(p, **changes) if p.name == name else p
                                    for p in obs.pools))
