"""Prometheus metrics of the adapter cache (`stepfleet_adapter_*`), on the worker's registry.

Names carry their unit, as every worker metric does (`serving.metrics`): hits and misses per
tier say whether the tiers are sized right, loads and their seconds what misses cost, bytes
per tier how full each is.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HITS = "stepfleet_adapter_cache_hits_total"
MISSES = "stepfleet_adapter_cache_misses_total"
LOADS = "stepfleet_adapter_loads_total"
LOAD_SECONDS = "stepfleet_adapter_load_seconds"
EVICTIONS = "stepfleet_adapter_cache_evictions_total"
TIER_BYTES = "stepfleet_adapter_cache_bytes"
ADAPTERS = "stepfleet_adapters"

_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class AdapterMetrics:
    def __init__(self, pool: str = "local", registry: CollectorRegistry | None = None) -> None:
        self.pool = pool
        r = registry or CollectorRegistry()
        self._hits = Counter(HITS, "Adapter lookups found in a cache tier.", ["pool", "tier"], registry=r)
        self._misses = Counter(MISSES, "Adapter lookups not found in a cache tier.", ["pool", "tier"], registry=r)
        self._loads = Counter(LOADS, "Adapter loads onto the device, by outcome.", ["pool", "outcome"], registry=r)
        self._seconds = Histogram(LOAD_SECONDS, "Time to bring an adapter onto the device.", ["pool"],
                                  buckets=_LOAD_BUCKETS, registry=r)
        self._evictions = Counter(EVICTIONS, "Adapters evicted from a cache tier.", ["pool", "tier"], registry=r)
        self._bytes = Gauge(TIER_BYTES, "Bytes of adapters held in a cache tier.", ["pool", "tier"], registry=r)
        self._count = Gauge(ADAPTERS, "Adapters registered on this worker.", ["pool"], registry=r)

    def hit(self, tier: str) -> None:
        self._hits.labels(self.pool, tier).inc()

    def miss(self, tier: str) -> None:
        self._misses.labels(self.pool, tier).inc()

    def load(self, outcome: str, seconds: float) -> None:
        self._loads.labels(self.pool, outcome).inc()
        if outcome == "ok":
            self._seconds.labels(self.pool).observe(seconds)

    def evicted(self, tier: str) -> None:
        self._evictions.labels(self.pool, tier).inc()

    def tier_bytes(self, tier: str, value: int) -> None:
        self._bytes.labels(self.pool, tier).set(value)

    def adapters(self, count: int) -> None:
        self._count.labels(self.pool).set(count)
