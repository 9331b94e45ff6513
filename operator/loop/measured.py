"""What the data plane reported over one window, however it was read.

Both metric paths — Prometheus queries (`prometheus`) and scraped worker counters
(`scraping`) — produce these, so everything after measuring is the same for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolMetrics:
    #: Every request, videos included (the total the demand is planned on).
    requests_rps: float = 0.0
    #: The SLO-percentile request latency over the window (None: no request finished).
    latency_s: float | None = None
    queue_depth: float = 0.0
    #: Video jobs among `requests_rps` (the worker's `kind="video"` series): a video costs
    #: many images' device time, so the policy plans it apart (`policy.kinds`).
    video_rps: float = 0.0

    @property
    def image_rps(self) -> float:
        """Every other kind (generations, edits, variations, templates): the image requests."""
        return max(0.0, self.requests_rps - self.video_rps)


@dataclass(frozen=True)
class Metrics:
    """What the data plane reported over one window."""

    window_s: float
    pools: Mapping[str, PoolMetrics] = field(default_factory=dict)

    @property
    def arrival_rps(self) -> float:
        return sum(p.requests_rps for p in self.pools.values())

    @property
    def video_rps(self) -> float:
        return sum(p.video_rps for p in self.pools.values())

