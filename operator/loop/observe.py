"""The observe half of the loop, one job per module, and the signals they add up to.

Pure on purpose (no HTTP, no Kubernetes client, no clock): everything the timer reads comes
in as plain data — Prometheus answers as decoded JSON, a worker's `/metrics` as text, Events,
Pods, Deployments and NodeClaims as dicts, the time as epoch seconds — so every rule is
tested without I/O, and a malformed input is refused with `ObservationError` (which the
timer turns into a condition, keeping its last plan) rather than guessed around.

| job | module |
|---|---|
| the spec as the policy sees it | `specmap` |
| metrics by scraping worker `/metrics` | `scraping` (into `measured.Metrics`) |
| metrics from Prometheus | `prometheus` (into `measured.Metrics`) |
| capacity signals (Karpenter Events, Pending and un-ready pods, failed model loads) | `capacity` |
| reading pods and timestamps | `pods` |
| the per-pool observations the control step takes | here |

The names of those modules are re-exported here, so `observe.X` keeps working for callers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepfleet.operator.policy import Observation, PoolObservation

from .capacity import (
    INSUFFICIENT_CAPACITY_REASON,
    KARPENTER_NODEPOOL_LABEL,
    MAX_LOAD_ERROR_CHARS,
    LoadFailure,
    load_failures,
    merge_shortages,
    readyz_failure,
    shortages_from_events,
    shortages_from_pods,
    shortages_from_unready_pods,
)
from .errors import ObservationError
from .measured import Metrics, PoolMetrics
from .pods import (
    STUCK_REASONS,
    format_time,
    parse_time,
    pod_pool,
    pod_ready,
    readyz_url,
    scrape_url,
)
from .prometheus import (
    MIN_PROMETHEUS_WINDOW_S,
    metrics_from_prometheus,
    prometheus_queries,
    prometheus_window,
)
from .scraping import WorkerSample, histogram_quantile, metrics_from_scrapes, parse_worker_metrics
from .specmap import DEFAULT_LATENCY_SHARE, DEFAULT_THROUGHPUT_RPS, policy_spec

__all__ = [
    "DEFAULT_LATENCY_SHARE", "DEFAULT_THROUGHPUT_RPS", "INSUFFICIENT_CAPACITY_REASON",
    "KARPENTER_NODEPOOL_LABEL", "MAX_LOAD_ERROR_CHARS", "MIN_PROMETHEUS_WINDOW_S", "STUCK_REASONS",
    "LoadFailure", "Metrics", "ObservationError", "PoolMetrics", "WorkerSample", "build_observation",
    "format_time", "histogram_quantile", "load_failures", "merge_shortages", "metrics_from_prometheus",
    "metrics_from_scrapes", "parse_time", "parse_worker_metrics", "pod_pool", "pod_ready",
    "pool_observations", "policy_spec", "prometheus_queries", "prometheus_window", "readyz_failure",
    "readyz_url", "scrape_url", "shortages_from_events", "shortages_from_pods",
    "shortages_from_unready_pods",
]


def pool_observations(
    pools: Sequence[str],
    deployments: Mapping[str, Mapping[str, Any] | None],
    metrics: Metrics,
    shortages: Mapping[str, float],
) -> tuple[PoolObservation, ...]:
    """Each pool as the control step sees it: replicas from its Deployment, measurements, shortages."""
    observed = []
    for pool in pools:
        dep = deployments.get(pool) or {}
        desired = int((dep.get("spec") or {}).get("replicas") or 0)
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        m = metrics.pools.get(pool) or PoolMetrics()
        observed.append(
            PoolObservation(
                name=pool,
                desired_replicas=desired,
                ready_replicas=ready,
                pending_replicas=max(0, desired - ready),
                latency_s=m.latency_s,
                queue_depth=m.queue_depth,
                capacity_short_since=shortages.get(pool),
            )
        )
    return tuple(observed)


def build_observation(
    now_s: float,
    pools: Sequence[str],
    deployments: Mapping[str, Mapping[str, Any] | None],
    demand: tuple[float, float],
    metrics: Metrics,
    shortages: Mapping[str, float],
) -> Observation:
    """`decide`'s input directly (demand already estimated): for callers outside the step."""
    rate, trend = demand
    return Observation(now_s=now_s, arrival_rps=rate, arrival_trend_rps_per_s=trend,
                       pools=pool_observations(pools, deployments, metrics, shortages))
