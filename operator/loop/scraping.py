"""Metrics without Prometheus: worker `/metrics` scraped and differenced between two runs.

Counters of every ready pool pod, differenced between two scrapes (a counter that went down
restarted: its value is the increase, as Prometheus's `rate` treats it; a pod seen once
contributes from its second scrape on). The latency quantile is Prometheus's
`histogram_quantile` over the merged bucket increases. Video jobs (`kind="video"`) are counted
apart as well as in the total, so the policy can plan them in device time (`policy.kinds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from stepfleet.serving import metrics as worker_metrics
from stepfleet.serving.contracts import RequestKind

from .errors import ObservationError
from .measured import Metrics, PoolMetrics


@dataclass(frozen=True)
class WorkerSample:
    """One scrape of one worker: cumulative counters and current gauges."""

    requests_total: float
    #: Request-latency histogram summed over kinds: (upper bound, cumulative count), ascending.
    latency_buckets: tuple[tuple[float, float], ...]
    queue_depth: float
    #: Cumulative video jobs (`kind="video"`) among `requests_total`.
    video_requests_total: float = 0.0


def parse_worker_metrics(text: str) -> WorkerSample:
    """Read a worker's `/metrics` (Prometheus text format); raises ObservationError if malformed."""
    requests = 0.0
    videos = 0.0
    buckets: dict[float, float] = {}
    queue = 0.0
    seen = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if sample.name == worker_metrics.REQUESTS:
                    requests += value
                    if sample.labels.get("kind") == RequestKind.VIDEO.value:
                        videos += value
                    seen = True
                elif sample.name == worker_metrics.REQUEST_SECONDS + "_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + value
                elif sample.name == worker_metrics.QUEUE_DEPTH:
                    queue += value
                    seen = True
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ObservationError(f"malformed worker metrics: {exc}") from exc
    if not seen:
        raise ObservationError(
            f"worker metrics lack {worker_metrics.REQUESTS} and {worker_metrics.QUEUE_DEPTH}"
        )
    if any(not math.isfinite(v) or v < 0 for v in (requests, queue, videos, *buckets.values())):
        raise ObservationError("worker metrics hold negative or non-finite values")
    return WorkerSample(requests, tuple(sorted(buckets.items())), queue, videos)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's `histogram_quantile` over (upper bound, cumulative count) buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # in the open top bucket: the highest finite bound, as Prometheus
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _increase(now: float, before: float | None) -> float:
    if before is None:
        return 0.0
    return now - before if now >= before else now  # a reset: the counter restarted from 0


def metrics_from_scrapes(
    previous: Mapping[str, WorkerSample],
    current: Mapping[str, WorkerSample],
    pod_pools: Mapping[str, str],
    pools: Iterable[str],
    window_s: float,
    quantile: float,
) -> Metrics:
    """Rates per pool between two scrapes `window_s` apart (pods keyed by name)."""
    if window_s <= 0:
        raise ObservationError("scrapes are not apart in time")
    out: dict[str, PoolMetrics] = {}
    for pool in pools:
        pods = [name for name, p in pod_pools.items() if p == pool and name in current]
        requests = 0.0
        videos = 0.0
        queue = 0.0
        merged: dict[float, float] = {}
        for pod in pods:
            now, before = current[pod], previous.get(pod)
            queue += now.queue_depth
            if before is None:
                continue
            requests += _increase(now.requests_total, before.requests_total)
            videos += _increase(now.video_requests_total, before.video_requests_total)
            old = dict(before.latency_buckets)
            for le, count in now.latency_buckets:
                merged[le] = merged.get(le, 0.0) + _increase(count, old.get(le))
        out[pool] = PoolMetrics(
            requests_rps=requests / window_s,
            latency_s=histogram_quantile(quantile, sorted(merged.items())),
            queue_depth=queue,
            video_rps=videos / window_s,
        )
    return Metrics(window_s=window_s, pools=out)

