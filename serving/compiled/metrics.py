"""Prometheus families of the compiled path, brought up to date at scrape time.

Compile progress and seconds per bucket (warm-up), the graphs torch compiled and its FX-graph
cache hits and misses (from torch's own counters: a replica that started from a warm
persistent cache shows hits, not compiles), and steps by path (compiled, or eager and why).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from stepfleet.serving.compiled.denoiser import CompiledDenoiser, dynamo_counters

COMPILE_BUCKETS = "stepfleet_compile_buckets"
COMPILE_SECONDS = "stepfleet_compile_seconds"
COMPILE_GRAPHS = "stepfleet_compile_graphs"
COMPILE_CACHE = "stepfleet_compile_cache_lookups"
COMPILED_STEPS = "stepfleet_compiled_steps"


class CompileMetrics:
    """Gauges over a `CompiledDenoiser` (all set from its snapshot; cumulative values stay monotonic)."""

    def __init__(self, pool: str, registry: CollectorRegistry) -> None:
        self.pool = pool
        self.buckets = Gauge(COMPILE_BUCKETS, "Shape buckets of the compiled denoiser, by state (total, compiled).",
                             ["pool", "state"], registry=registry)
        self.seconds = Gauge(COMPILE_SECONDS, "Warm-up seconds spent compiling each bucket (rows x latent shape).",
                             ["pool", "bucket"], registry=registry)
        self.graphs = Gauge(COMPILE_GRAPHS, "Graphs torch compiled in this process (torch._dynamo counters).",
                            ["pool"], registry=registry)
        self.cache = Gauge(COMPILE_CACHE, "Inductor FX-graph cache lookups, by result (hit, miss).",
                           ["pool", "result"], registry=registry)
        self.steps = Gauge(COMPILED_STEPS, "Denoising steps by path: compiled, or eager and why.",
                           ["pool", "path"], registry=registry)

    def observe(self, compiled: CompiledDenoiser) -> None:
        snap = compiled.snapshot()
        self.buckets.labels(self.pool, "total").set(snap.buckets_total)
        self.buckets.labels(self.pool, "compiled").set(snap.buckets_done)
        for label, seconds in snap.compile_seconds.items():
            self.seconds.labels(self.pool, label).set(seconds)
        counters = dynamo_counters()
        self.graphs.labels(self.pool).set(counters["unique_graphs"])
        self.cache.labels(self.pool, "hit").set(counters["fxgraph_cache_hit"])
        self.cache.labels(self.pool, "miss").set(counters["fxgraph_cache_miss"])
        self.steps.labels(self.pool, "compiled").set(snap.compiled_calls)
        for reason, count in snap.eager_calls.items():
            self.steps.labels(self.pool, f"eager: {reason}").set(count)
