"""What a simulated control loop can see: the fleet's counts and the recent request log.

Controllers (ours and the baselines) read the fleet only through this view, as a real loop
reads Kubernetes objects and Prometheus: replica counts per state, Karpenter's insufficient
capacity reports, request rates over a trailing window, latency percentiles, queue depth.
Measurements are computed on demand from the request log, so a controller that needs only
a rate pays for nothing else.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

from .fleet import Fleet


class RequestLog:
    """Per-request outcomes, written by the engine in arrival order.

    `latency` holds the latency in seconds of a served request, or a negative code for a
    failed one: NO_REPLICA (routed to a pool with no ready replica: HTTP 503), REJECTED
    (queue bound reached: HTTP 429), LOST (its replica died under it).
    """

    NO_REPLICA, REJECTED, LOST = -1.0, -2.0, -3.0

    def __init__(self, arrival_s: np.ndarray) -> None:
        size = len(arrival_s)
        self.arrival_s = arrival_s
        self.latency = array("d", bytes(8 * size))
        self.pool = array("b", bytes(size))
        self.replica = array("l", bytes(array("l").itemsize * size))
        # Zero-copy numpy views; the arrays never resize, so the views stay valid.
        self.latency_np = np.frombuffer(self.latency, dtype=np.float64)
        self.pool_np = np.frombuffer(self.pool, dtype=np.int8)
        self.replica_np = np.frombuffer(self.replica, dtype=np.dtype("l"))
        self.count = 0  # requests dispatched so far

    def index_at(self, t: float) -> int:
        """Index of the first request arriving at or after `t` (within those dispatched)."""
        return int(np.searchsorted(self.arrival_s[: self.count], t, side="left"))

    def fail_lost(self, replica_ids: list[int], now_s: float, lookback_s: float) -> int:
        """Mark requests still queued or running on dead replicas as LOST; returns how many."""
        if not replica_ids or not self.count:
            return 0
        lo = self.index_at(now_s - lookback_s)
        hi = self.count
        lat = self.latency_np[lo:hi]
        hit = (np.isin(self.replica_np[lo:hi], np.asarray(replica_ids))
               & (lat >= 0) & (self.arrival_s[lo:hi] + lat > now_s))
        lat[hit] = self.LOST
        return int(hit.sum())


@dataclass(frozen=True)
class PoolCounts:
    name: str
    price_per_hour: float
    desired: int
    ready: int
    starting: int
    unschedulable: int
    unschedulable_since: float | None
    last_ice_s: float


class FleetView:
    def __init__(self, now_s: float, fleet: Fleet, log: RequestLog) -> None:
        self.now_s = now_s
        self._fleet = fleet
        self._log = log
        self.pools = tuple(
            PoolCounts(p.name, p.price, p.live, len(p.ready), len(p.starting),
                       len(p.unschedulable), p.unschedulable_since, p.last_ice_s)
            for p in fleet.pools)

    def _window(self, window_s: float) -> tuple[int, int, float]:
        span = min(window_s, self.now_s)
        return self._log.index_at(self.now_s - span), self._log.count, span

    def arrival_rate(self, window_s: float) -> float:
        """All requests per second over the trailing window (0 before any time passed)."""
        lo, hi, span = self._window(window_s)
        return (hi - lo) / span if span > 0 else 0.0

    def pool_arrival_rates(self, window_s: float) -> list[float]:
        """Requests per second routed to each pool over the trailing window."""
        lo, hi, span = self._window(window_s)
        if span <= 0:
            return [0.0] * len(self.pools)
        counts = np.bincount(self._log.pool_np[lo:hi].astype(np.int64) + 1,
                             minlength=len(self.pools) + 1)
        return [float(c) / span for c in counts[1:]]

    def latency_percentile(self, pool: int, window_s: float, q: float) -> float | None:
        """q-quantile of served requests' latency in the pool over the window (None: none)."""
        lo, hi, _ = self._window(window_s)
        lat = self._log.latency_np[lo:hi]
        mine = lat[(self._log.pool_np[lo:hi] == pool) & (lat >= 0)]
        return float(np.quantile(mine, q)) if mine.size else None

    def queue_depth(self, pool: int) -> float:
        return self._fleet.pools[pool].queue_depth(self.now_s)
