"""Prometheus metrics of a worker: names are a contract (dashboards, alerts, the control loop).

Every family is prefixed `stepfleet_`, carries its unit in its name, and is labelled with
the worker's `pool`, so one Prometheus query can compare pools. Each app gets its own
registry, so several workers can live in one test process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stepfleet.serving.contracts import RequestKind

if TYPE_CHECKING:
    from stepfleet.serving.engine import BatchingReport

#: Metric names other components rely on (the operator's observer, dashboards, alerts).
QUEUE_DEPTH = "stepfleet_queue_depth"
RUNNING_BATCH = "stepfleet_running_batch_size"
STEP_SECONDS = "stepfleet_step_duration_seconds"
REQUEST_SECONDS = "stepfleet_request_duration_seconds"
QUEUE_SECONDS = "stepfleet_queue_wait_seconds"
REQUESTS = "stepfleet_requests_total"
IMAGES = "stepfleet_images_generated_total"
SLO = "stepfleet_slo_requests_total"
PREEMPTIONS = "stepfleet_preemptions_total"
READY = "stepfleet_worker_ready"
BACKLOG_SECONDS = "stepfleet_backlog_seconds"
CACHE_HITS = "stepfleet_template_cache_hits_total"
CACHE_MISSES = "stepfleet_template_cache_misses_total"
CACHE_MEMORY_BYTES = "stepfleet_template_cache_memory_bytes"
CACHE_DISK_BYTES = "stepfleet_template_cache_disk_bytes"
CACHE_LOAD_SECONDS = "stepfleet_template_cache_load_seconds_total"
CACHE_EVICTIONS = "stepfleet_template_cache_evictions_total"
BATCH_CAP = "stepfleet_batch_cap"
BATCH_SIZING = "stepfleet_batch_sizing"
STEP_COST_SECONDS = "stepfleet_step_cost_seconds"
#: Images and videos on one engine (`serving.coschedule`).
KIND_QUEUE_DEPTH = "stepfleet_kind_queue_depth"
PAUSED_VIDEOS = "stepfleet_paused_videos"
VIDEO_PREEMPTIONS = "stepfleet_video_preemptions_total"

#: `planner.SizingMode` values (kept literal: metrics import no planner).
SIZING_MODES = ("light", "backlog", "deadline")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
_STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class WorkerMetrics:
    """The worker's metric families, and the engine observer hooks that feed them."""

    def __init__(self, pool: str = "local", registry: CollectorRegistry | None = None) -> None:
        self.pool = pool
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(QUEUE_DEPTH, "Requests accepted but not yet running.", ["pool"], registry=r)
        self.running_batch = Gauge(RUNNING_BATCH, "Images in the last denoising step's batch.", ["pool"], registry=r)
        self.step_seconds = Histogram(
            STEP_SECONDS, "Duration of one batched denoising step.", ["pool"], buckets=_STEP_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            REQUEST_SECONDS,
            "End-to-end request latency inside the worker, by kind.",
            ["pool", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            QUEUE_SECONDS, "Time from arrival to first denoising step.", ["pool", "kind"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(REQUESTS, "Requests by kind and outcome.", ["pool", "kind", "status"], registry=r)
        self.images = Counter(IMAGES, "Images returned to clients.", ["pool"], registry=r)
        self.slo = Counter(
            SLO, "Requests with an explicit deadline, by whether it was met.", ["pool", "kind", "outcome"], registry=r
        )
        self.preemptions = Counter(PREEMPTIONS, "Requests paused at a step boundary for a more urgent one.", ["pool"],
                                   registry=r)
        self.ready = Gauge(READY, "1 once the model is loaded and warmed up.", ["pool"], registry=r)
        self.backlog = Gauge(BACKLOG_SECONDS, "Estimated seconds to finish all accepted work.", ["pool"], registry=r)
        # Template cache (edits): counters follow `TemplateCache.stats`, synced on each scrape.
        self.cache_hits = Counter(CACHE_HITS, "Template cache reads served from memory.", ["pool"], registry=r)
        self.cache_misses = Counter(CACHE_MISSES, "Template cache reads that went to disk or found nothing.",
                                    ["pool"], registry=r)
        self.cache_memory = Gauge(CACHE_MEMORY_BYTES, "Template activations held in host memory.", ["pool"],
                                  registry=r)
        self.cache_disk = Gauge(CACHE_DISK_BYTES, "Template activations spilled to disk.", ["pool"], registry=r)
        self.cache_load_seconds = Counter(CACHE_LOAD_SECONDS, "Time spent reading template activations from disk.",
                                          ["pool"], registry=r)
        self.cache_evictions = Counter(CACHE_EVICTIONS, "Template steps dropped from both tiers.", ["pool"],
                                       registry=r)
        # Batch sizing (issue 21): the cap, the rule that set it, and the learned curve behind it.
        self.batch_cap = Gauge(BATCH_CAP, "Images the planner lets share one step now (max batch when uncapped).",
                               ["pool"], registry=r)
        self.batch_sizing = Gauge(BATCH_SIZING, "1 for the rule sizing batches now: light, backlog or deadline.",
                                  ["pool", "mode"], registry=r)
        self.step_cost = Gauge(STEP_COST_SECONDS, "Learned seconds of one step by cost key (shape) and UNet rows.",
                               ["pool", "shape", "rows"], registry=r)
        self.kind_queue = Gauge(KIND_QUEUE_DEPTH, "Requests waiting for their first step, by kind (image, video).",
                                ["pool", "kind"], registry=r)
        self.paused_videos = Gauge(PAUSED_VIDEOS, "Videos started and paused at a step boundary (latents held).",
                                   ["pool"], registry=r)
        self.video_preemptions = Counter(VIDEO_PREEMPTIONS, "Videos paused so that an image meets its deadline.",
                                         ["pool"], registry=r)
        for k in ("image", "video"):
            self.kind_queue.labels(self.pool, k)
        self.paused_videos.labels(self.pool)
        self.video_preemptions.labels(self.pool)
        self._cache_seen: dict[str, float] = {}
        for fam in (self.queue_depth, self.running_batch, self.ready, self.backlog, self.preemptions,
                    self.images, self.step_seconds, self.cache_hits, self.cache_misses, self.cache_memory,
                    self.cache_disk, self.cache_load_seconds, self.cache_evictions):
            fam.labels(self.pool)
        for outcome in ("met", "missed"):  # SLO ratio rules read 0, not "no data", before the first miss
            self.slo.labels(self.pool, "generation", outcome)

    def observe_cache(self, snapshot: dict[str, float]) -> None:
        """Bring the cache families up to a `TemplateCache.snapshot()` (counters advance by the difference)."""
        for field, counter in (("hits", self.cache_hits), ("misses", self.cache_misses),
                               ("load_seconds", self.cache_load_seconds), ("evictions", self.cache_evictions)):
            now = float(snapshot.get(field, 0))
            delta = now - self._cache_seen.get(field, 0.0)
            if delta > 0:
                counter.labels(self.pool).inc(delta)
            self._cache_seen[field] = max(now, self._cache_seen.get(field, 0.0))
        self.cache_memory.labels(self.pool).set(snapshot.get("bytes_memory", 0))
        self.cache_disk.labels(self.pool).set(snapshot.get("bytes_disk", 0))

    # EngineObserver hooks -------------------------------------------------------------
    def on_step(self, seconds: float, batch_images: int, queue_depth: int) -> None:
        self.step_seconds.labels(self.pool).observe(seconds)
        self.running_batch.labels(self.pool).set(batch_images)
        self.queue_depth.labels(self.pool).set(queue_depth)

    def on_finish(self, request, outcome: str) -> None:  # request: EngineRequest
        kind = RequestKind(request.kind).value
        if kind == RequestKind.WARMUP.value:
            return
        self.requests.labels(self.pool, kind, outcome).inc()
        if outcome != "ok":
            return
        self.images.labels(self.pool).inc(request.params.n)
        self.request_seconds.labels(self.pool, kind).observe(request.finished_at - request.arrival)
        if request.started_at is not None:
            self.queue_seconds.labels(self.pool, kind).observe(request.started_at - request.arrival)
        met = request.deadline_met
        if met is not None:
            self.slo.labels(self.pool, kind, "met" if met else "missed").inc()

    def on_preempt(self, count: int) -> None:
        self.preemptions.labels(self.pool).inc(count)

    def on_kinds(self, waiting: dict[str, int], paused_videos: int, videos_preempted: int) -> None:
        """Per-kind state after a step's plan: waiting requests by kind, videos held paused, videos
        this plan paused."""
        for kind, count in waiting.items():
            self.kind_queue.labels(self.pool, kind).set(count)
        self.paused_videos.labels(self.pool).set(paused_videos)
        if videos_preempted:
            self.video_preemptions.labels(self.pool).inc(videos_preempted)

    def on_batching(self, report: BatchingReport) -> None:
        self.batch_cap.labels(self.pool).set(report.cap_images)
        for mode in SIZING_MODES:
            self.batch_sizing.labels(self.pool, mode).set(1 if mode == report.mode else 0)
        for shape, curve in report.curves.items():
            for rows, seconds in curve.items():
                self.step_cost.labels(self.pool, shape, str(rows)).set(seconds)

    def on_rejected(self, kind: str, status: str) -> None:
        """Requests refused before reaching the engine (validation, overload)."""
        self.requests.labels(self.pool, kind, status).inc()
