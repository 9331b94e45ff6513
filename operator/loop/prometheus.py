"""Metrics from Prometheus (`spec.controlLoop.prometheusUrl`): the queries and their answers.

Instant queries of rates over a window; series are selected by `namespace` and the worker
Services' names, the labels the ServiceMonitor the operator creates attaches. Answers come
in decoded (the HTTP is `sources`'); anything malformed is an `ObservationError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from stepfleet.serving import metrics as worker_metrics
from stepfleet.serving.contracts import RequestKind

from .errors import ObservationError
from .measured import Metrics, PoolMetrics

#: Shortest rate window for Prometheus queries: several scrapes (the ServiceMonitor's is 15 s).
MIN_PROMETHEUS_WINDOW_S = 60.0


def prometheus_window(interval_s: float) -> float:
    return max(interval_s, MIN_PROMETHEUS_WINDOW_S)


def prometheus_queries(namespace: str, service: str, window_s: float, quantile: float) -> dict[str, str]:
    """PromQL for the loop: per-pool request rate (all kinds, and videos), latency quantile and
    queue depth."""
    selector = f'namespace="{namespace}",service=~"{service}-.+"'
    window = f"{max(1, round(window_s))}s"
    return {
        "requests": f"sum by (pool) (rate({worker_metrics.REQUESTS}{{{selector}}}[{window}]))",
        "videos": (f'sum by (pool) (rate({worker_metrics.REQUESTS}{{{selector},kind="{RequestKind.VIDEO.value}"}}'
                   f"[{window}]))"),
        "latency": (
            f"histogram_quantile({quantile:g}, sum by (pool, le) "
            f"(rate({worker_metrics.REQUEST_SECONDS}_bucket{{{selector}}}[{window}])))"
        ),
        "queue": f"sum by (pool) ({worker_metrics.QUEUE_DEPTH}{{{selector}}})",
    }


def _vector(answer: Any, what: str) -> dict[str, float]:
    """pool -> value from a `/api/v1/query` answer; NaN values are dropped."""
    if not isinstance(answer, Mapping) or answer.get("status") != "success":
        error = answer.get("error") if isinstance(answer, Mapping) else None
        raise ObservationError(f"Prometheus {what} query failed: {error or str(answer)[:120]}")
    data = answer.get("data")
    if not isinstance(data, Mapping) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise ObservationError(f"Prometheus {what} answer is not an instant vector: {str(data)[:120]}")
    out: dict[str, float] = {}
    for item in data["result"]:
        try:
            pool = item["metric"].get("pool", "")
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ObservationError(f"malformed Prometheus {what} sample {str(item)[:120]}: {exc}") from exc
        if math.isnan(value):
            continue
        out[pool] = out.get(pool, 0.0) + value
    return out


def metrics_from_prometheus(answers: Mapping[str, Any], pools: Iterable[str], window_s: float) -> Metrics:
    """Metrics from the decoded answers to `prometheus_queries` (same keys).

    An answer set without `videos` (a caller that did not ask for the split) counts no video;
    an answer that is there is checked like the others.
    """
    requests = _vector(answers.get("requests"), "requests")
    latency = _vector(answers.get("latency"), "latency")
    queue = _vector(answers.get("queue"), "queue")
    videos = _vector(answers["videos"], "videos") if "videos" in answers else {}
    for what, values in (("requests", requests), ("queue", queue), ("videos", videos)):
        if any(v < 0 or math.isinf(v) for v in values.values()):
            raise ObservationError(f"Prometheus {what} query gave a negative or infinite value")
    out = {}
    for pool in pools:
        lat = latency.get(pool)
        out[pool] = PoolMetrics(
            requests_rps=requests.get(pool, 0.0),
            latency_s=lat if lat is not None and math.isfinite(lat) and lat >= 0 else None,
            queue_depth=queue.get(pool, 0.0),
            # Two queries over one window can disagree by a scrape: never more videos than requests.
            video_rps=min(videos.get(pool, 0.0), requests.get(pool, 0.0)),
        )
    return Metrics(window_s=window_s, pools=out)

