"""One resolved view per pool: the spec's limits merged with what was just observed.

Every later step (allocation, weights, stabilization) needs the same handful of facts —
current price, throughput, whether the pool can meet the SLO at all, how much it can serve
— so they are worked out once here, with measured values winning over declared ones.
Requests are converted to device time here too (`kinds`: a video job is many images), so
every later step follows the mix of images and videos without knowing about kinds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .costmodel import price_per_image, replicas_for, servable_rps
from .kinds import units_per_request, video_throughput
from .model import Observation, PolicySpec, PoolObservation, PoolSpec


@dataclass(frozen=True)
class PoolView:
    name: str
    price_per_hour: float
    throughput_rps: float
    latency_s: float
    service_cv: float
    provision_s: float
    min_replicas: int
    max_replicas: int
    desired: int
    ready: int
    pending: int
    queue_depth: float
    measured_latency_s: float | None
    short_since: float | None
    #: Whether an idle replica meets the SLO latency at all.
    meets_slo: bool
    slo_latency_s: float
    allowed_late: float
    max_utilization: float
    domain: str = ""
    capacity_type: str = "on-demand"
    #: Videos/s one replica serves, and the share of the demand that is videos (`kinds`).
    video_throughput_rps: float = 0.0
    video_share: float = 0.0

    @property
    def units_per_request(self) -> float:
        """Image-equivalents of device time per request of the current mix (1.0: images only)."""
        return units_per_request(self.video_share, self.throughput_rps, self.video_throughput_rps)

    @property
    def request_throughput_rps(self) -> float:
        """Requests of the current mix per second one replica serves (`throughput_rps` for images)."""
        return self.throughput_rps / self.units_per_request

    @property
    def price_per_image(self) -> float:
        """Price per request of the current mix (per image when no videos come)."""
        return price_per_image(self.price_per_hour, self.request_throughput_rps)

    def servable(self, replicas: int) -> float:
        """Requests per second `replicas` replicas of this pool serve within the SLO.

        The one place requests meet throughput (with `replicas_for`): the queueing model
        sizes image-equivalents, and a request of the mix is `units_per_request` of them.
        """
        if not self.meets_slo:
            return 0.0
        return servable_rps(replicas, self.throughput_rps, self.latency_s, self.slo_latency_s,
                            self.allowed_late, self.service_cv,
                            self.max_utilization) / self.units_per_request

    def replicas_for(self, rate_rps: float) -> int:
        """Fewest replicas serving `rate_rps` within the SLO (unclamped)."""
        if not self.meets_slo or not math.isfinite(self.units_per_request):
            return 0
        return replicas_for(rate_rps * self.units_per_request, self.throughput_rps, self.latency_s,
                            self.slo_latency_s, self.allowed_late, self.service_cv,
                            self.max_utilization)

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


def resolve(spec: PolicySpec, obs: Observation,
            learned_provision_s: Mapping[str, float] | None = None) -> tuple[PoolView, ...]:
    """Views for every pool in the spec, in spec order (a pool not observed is empty).

    `learned_provision_s` holds provisioning times measured on the pool itself; they win
    over the declared ones (a model that takes 9 minutes to load is planned as 9 minutes).
    """
    allowed_late = max(0.0, 1.0 - spec.slo.percentile) * spec.control.tail_budget
    learned = learned_provision_s or {}
    return tuple(_view(p, obs.pool(p.name) or PoolObservation(name=p.name), spec, allowed_late,
                       learned.get(p.name), obs.video_share)
                 for p in spec.pools)


def _view(p: PoolSpec, o: PoolObservation, spec: PolicySpec, allowed_late: float,
          provision_s: float | None, video_share: float = 0.0) -> PoolView:
    throughput = o.throughput_rps_per_replica or p.throughput_rps_per_replica
    price = p.price_per_hour if o.price_per_hour is None else o.price_per_hour
    slack = spec.slo.latency_s - p.latency_s * (1.0 + 2.0 * p.service_cv)
    return PoolView(
        name=p.name,
        price_per_hour=price,
        throughput_rps=throughput,
        latency_s=p.latency_s,
        service_cv=p.service_cv,
        provision_s=p.provision_s if provision_s is None else provision_s,
        min_replicas=p.min_replicas,
        max_replicas=p.max_replicas,
        desired=o.desired_replicas,
        ready=o.ready_replicas,
        pending=o.pending_replicas,
        queue_depth=max(0.0, o.queue_depth),
        measured_latency_s=o.latency_s,
        short_since=o.capacity_short_since,
        meets_slo=slack > 0 and throughput > 0,
        slo_latency_s=spec.slo.latency_s,
        allowed_late=allowed_late,
        max_utilization=spec.control.max_utilization,
        domain=p.domain,
        capacity_type=p.capacity_type,
        video_throughput_rps=video_throughput(
            o.video_throughput_rps_per_replica or p.video_throughput_rps_per_replica, throughput),
        video_share=video_share,
    )
