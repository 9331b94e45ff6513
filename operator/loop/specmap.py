"""The DiffusionService spec as the pure policy sees it (`PolicySpec`).

Pools get their failure domain here: `failureDomain` when the spec gives one, otherwise
`CAPACITY/FAMILY` from the NodePool's capacity types (a pool that may only run on spot is
`spot`) and its instance families, or the accelerator's model — pools that share both are
lost together (one spot market, one instance family), others are not.
"""

from __future__ import annotations

from stepfleet.operator import compilation
from stepfleet.operator.models import DiffusionServiceSpec
from stepfleet.operator.models import PoolSpec as ServicePool
from stepfleet.operator.policy import ControlSettings, PolicySpec, PoolSpec, SloSpec
from stepfleet.operator.policy.model import CapacityType

#: Throughput assumed for a pool whose spec gives none (as the router's starting weights do).
DEFAULT_THROUGHPUT_RPS = 1.0
#: Without a measured latency, a replica is assumed to take this share of the SLO target.
DEFAULT_LATENCY_SHARE = 0.5


def policy_spec(spec: DiffusionServiceSpec) -> PolicySpec:
    """The pure policy's view of a DiffusionService spec."""
    loop = spec.control_loop
    slo_latency = spec.slo.latency_seconds
    return PolicySpec(
        slo=SloSpec(latency_s=slo_latency, percentile=spec.slo.percentile / 100.0),
        pools=tuple(
            PoolSpec(
                name=p.name,
                price_per_hour=p.price_per_hour,
                throughput_rps_per_replica=p.throughput_per_replica or DEFAULT_THROUGHPUT_RPS,
                video_throughput_rps_per_replica=p.video_throughput_per_replica,
                latency_s=slo_latency * DEFAULT_LATENCY_SHARE,
                # A compiled pool's replicas also compile every shape bucket before serving.
                provision_s=compilation.provisioning_seconds(spec, p),
                min_replicas=p.min_replicas,
                max_replicas=p.max_replicas,
                failure_domain=failure_domain(p),
                capacity_type=capacity_type(p),
            )
            for p in spec.pools
        ),
        mode=spec.mode,
        control=ControlSettings(
            interval_s=loop.interval_seconds,
            dwell_s=loop.dwell_seconds,
            recovery_window_s=loop.recovery_window_seconds,
            stabilization_s=loop.stabilization_seconds,
            hedge_spot=loop.hedge_spot,
            hedge_on_demand=loop.hedge_on_demand,
            hedge_after_loss=loop.hedge_after_loss,
            loss_memory_s=loop.loss_memory_seconds,
            loss_fraction=loop.loss_fraction,
        ),
    )



def capacity_type(pool: ServicePool) -> CapacityType:
    """`spot` for a pool whose NodePool may only get spot nodes; else on-demand (or reserved)."""
    types = set(pool.node_pool.capacity_types) if pool.node_pool else {"on-demand"}
    if types == {"spot"}:
        return "spot"
    if types == {"reserved"}:
        return "reserved"
    return "on-demand"


def failure_domain(pool: ServicePool) -> str:
    """`pool.failureDomain`, or `CAPACITY/FAMILY` from the node-pool and accelerator settings."""
    if pool.failure_domain:
        return pool.failure_domain
    families: list[str] = []
    if pool.node_pool is not None:
        families = sorted(pool.node_pool.instance_families) or sorted(
            {t.split(".", 1)[0] for t in pool.node_pool.instance_types})
    family = "+".join(families) or pool.accelerator.model or pool.accelerator.type
    return f"{capacity_type(pool)}/{family}"
