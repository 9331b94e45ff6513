"""Prometheus metrics of the router (names are a contract, like the worker's).

Conventions of serving/metrics.py: prefix `stepfleet_router_`, unit in the name, a `pool`
label (`none` when no pool was chosen: auth failures, 503s), one registry per app.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUESTS = "stepfleet_router_requests_total"
UPSTREAM_SECONDS = "stepfleet_router_upstream_duration_seconds"
RETRIES = "stepfleet_router_retries_total"
WEIGHT = "stepfleet_router_pool_weight_ratio"
ENDPOINTS = "stepfleet_router_pool_endpoints"
PREDICTION_ERROR = "stepfleet_router_prediction_error_ratio"
CONFIG_RELOADS = "stepfleet_router_config_reloads_total"
UNRESPONSIVE = "stepfleet_router_worker_unresponsive_total"
INFLIGHT = "stepfleet_router_inflight_requests"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
#: actual / predicted seconds: 1 is a perfect prediction.
_RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 8)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(REQUESTS, "Requests answered by the router, by pool, route and HTTP status.",
                                ["pool", "route", "status"], registry=r)
        self.upstream_seconds = Histogram(UPSTREAM_SECONDS, "Latency of one forwarded attempt, by pool.",
                                          ["pool", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter(RETRIES, "Attempts after the first, by the pool of the failed attempt and why.",
                               ["pool", "reason"], registry=r)
        self.weight = Gauge(WEIGHT, "Current share of new requests by pool (from the operator's config).",
                            ["pool"], registry=r)
        self.endpoints = Gauge(ENDPOINTS, "Workers known per pool, by whether they are usable now.",
                               ["pool", "state"], registry=r)
        self.prediction_error = Histogram(
            PREDICTION_ERROR, "Actual over predicted completion time of successful requests (1 = exact).",
            ["pool"], buckets=_RATIO_BUCKETS, registry=r)
        self.config_reloads = Counter(CONFIG_RELOADS, "Config file reloads by result.", ["result"], registry=r)
        self.unresponsive = Counter(UNRESPONSIVE, "Times a worker answered no load poll in time and was taken out "
                                    "of rotation (hung), by pool.", ["pool"], registry=r)
        self.inflight = Gauge(INFLIGHT, "Requests this router has in flight on workers, by pool (back to 0 when "
                              "idle: a leak shows here).", ["pool"], registry=r)
