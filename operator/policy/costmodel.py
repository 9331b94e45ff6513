"""Cost and capacity arithmetic: price per image, and how busy a replica may run.

Cost mode ranks pools by price per image, not price per hour: an accelerator that costs
more per hour but serves more images per second can be the cheaper one (the paper's table
has inf2 at $0.7582/h for 1.75 images/s beating an A10G at $1.006/h for 1.5).

How many replicas a demand needs depends on how busy each may run before queueing breaks
the latency SLO. A replica is modelled as a G/G/1 queue: requests reach it round-robin
from a Poisson stream split over `n` replicas (arrival variability 1/n: the more replicas,
the more regular each one's arrivals), service time varies by `service_cv`. Kingman's
approximation gives the mean wait, an exponential tail gives the chance a request waits
longer than the SLO leaves room for. Large pools may run hot (0.95); a pool of two or three
replicas must keep more slack. The estimate only sizes; the simulator checks it.
"""

from __future__ import annotations

import math

SECONDS_PER_HOUR = 3600.0


def price_per_image(price_per_hour: float, throughput_rps: float) -> float:
    """US dollars per image at full throughput; infinite for a pool that serves nothing."""
    if throughput_rps <= 0:
        return math.inf
    return price_per_hour / SECONDS_PER_HOUR / throughput_rps


def late_probability(
    utilization: float, replicas: int, service_s: float, slack_s: float, service_cv: float
) -> float:
    """Chance that a request waits longer than `slack_s` in one replica's queue.

    Kingman: E[W] = rho/(1-rho) * (ca2 + cs2)/2 * service_s with ca2 = 1/replicas; the
    tail P(W > x) ~ rho * exp(-rho * x / E[W]).
    """
    if slack_s <= 0:
        return 1.0
    if utilization <= 0:
        return 0.0
    if utilization >= 1:
        return 1.0
    variability = (1.0 / max(replicas, 1) + service_cv * service_cv) / 2.0
    if variability <= 0:
        return 0.0
    mean_wait = utilization / (1.0 - utilization) * variability * service_s
    return utilization * math.exp(-utilization * slack_s / mean_wait)


def max_utilization(
    replicas: int,
    throughput_rps: float,
    latency_s: float,
    slo_latency_s: float,
    allowed_late: float,
    service_cv: float,
    cap: float,
) -> float:
    """Highest utilization at which at most `allowed_late` of requests miss the SLO.

    Zero when the pool cannot meet the SLO even idle (its own latency, with a two-sigma
    allowance for service variation, leaves no slack).
    """
    if throughput_rps <= 0:
        return 0.0
    slack = slo_latency_s - latency_s * (1.0 + 2.0 * service_cv)
    if slack <= 0:
        return 0.0
    service_s = 1.0 / throughput_rps
    if late_probability(cap, replicas, service_s, slack, service_cv) <= allowed_late:
        return cap
    lo, hi = 0.0, cap
    for _ in range(40):
        mid = (lo + hi) / 2.0
        if late_probability(mid, replicas, service_s, slack, service_cv) <= allowed_late:
            lo = mid
        else:
            hi = mid
    return lo


def replicas_for(
    rate_rps: float,
    throughput_rps: float,
    latency_s: float,
    slo_latency_s: float,
    allowed_late: float,
    service_cv: float,
    cap: float,
) -> int:
    """Fewest replicas that serve `rate_rps` within the SLO; 0 for no demand or a pool
    that cannot meet the SLO at all.

    The allowed utilization grows with the replica count, so capacity n * mu * rho(n) is
    increasing in n: find an upper bound by fixed-point steps, then bisect for the least.
    """
    if rate_rps <= 0 or throughput_rps <= 0:
        return 0

    def capacity(n: int) -> float:
        return servable_rps(
            n, throughput_rps, latency_s, slo_latency_s, allowed_late, service_cv, cap
        )

    low = max(1, math.ceil(rate_rps / (throughput_rps * cap) - 1e-9))
    high = low
    while capacity(high) < rate_rps - 1e-9:
        rho = capacity(high) / (high * throughput_rps)
        if rho <= 0:
            return 0
        high = max(high + 1, math.ceil(rate_rps / (throughput_rps * rho) - 1e-9))
    while low < high:
        mid = (low + high) // 2
        if capacity(mid) >= rate_rps - 1e-9:
            high = mid
        else:
            low = mid + 1
    return high


def servable_rps(
    replicas: int,
    throughput_rps: float,
    latency_s: float,
    slo_latency_s: float,
    allowed_late: float,
    service_cv: float,
    cap: float,
) -> float:
    """Demand `replicas` replicas serve within the SLO (their planning capacity)."""
    if replicas <= 0:
        return 0.0
    rho = max_utilization(
        replicas, throughput_rps, latency_s, slo_latency_s, allowed_late, service_cv, cap
    )
    return replicas * throughput_rps * rho
