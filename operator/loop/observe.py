"""Observation building: raw samples, Events and objects in, the policy's `Observation` out.

Pure on purpose (no HTTP, no Kubernetes client, no clock): everything the timer reads comes
in as plain data — Prometheus answers as decoded JSON, a worker's `/metrics` as text, Events,
Pods, Deployments and NodeClaims as dicts, the time as epoch seconds — so every rule here
is tested without I/O, and a malformed input is refused with `ObservationError` (which the
timer turns into a condition, keeping its last plan) rather than guessed around.

Two metric paths give the same `Metrics`:

- Prometheus (`spec.controlLoop.prometheusUrl`): instant queries of rates over a window;
  series are selected by `namespace` and the worker Services' names, the labels the
  ServiceMonitor the operator creates attaches.
- Scraping (no Prometheus): counters of every ready pool pod, differenced between two
  scrapes (a counter that went down restarted: its value is the increase, as Prometheus's
  `rate` treats it; a pod seen once contributes from its second scrape on).

Capacity signals, per pool: Karpenter `InsufficientCapacityError` Events on NodeClaims of
the pool's NodePool (Karpenter deletes such NodeClaims at once, so a claim is matched by its
`karpenter.sh/nodepool` label when it still exists, else by its name, which Karpenter
derives from the NodePool's), counted while seen within a window; pool pods Pending as
Unschedulable for longer than the grace period; placed pods that stay un-ready; and pools
whose workers answer `/readyz` with `failed` (`load_failures`: the model will not load, so
the pool is short at once, and the loop reports the workers' error as Degraded/ModelLoadFailed).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from stepfleet.operator import names
from stepfleet.operator.models import DiffusionServiceSpec
from stepfleet.operator.policy import (
    ControlSettings,
    Observation,
    PolicySpec,
    PoolObservation,
    PoolSpec,
    SloSpec,
)
from stepfleet.serving import metrics as worker_metrics

#: Event reason Karpenter posts on a NodeClaim it could not launch.
INSUFFICIENT_CAPACITY_REASON = "InsufficientCapacityError"
KARPENTER_NODEPOOL_LABEL = "karpenter.sh/nodepool"
#: Throughput assumed for a pool whose spec gives none (as the router's starting weights do).
DEFAULT_THROUGHPUT_RPS = 1.0
#: Without a measured latency, a replica is assumed to take this share of the SLO target.
DEFAULT_LATENCY_SHARE = 0.5
#: Shortest rate window for Prometheus queries: several scrapes (the ServiceMonitor's is 15 s).
MIN_PROMETHEUS_WINDOW_S = 60.0


class ObservationError(Exception):
    """The fleet could not be observed well enough to decide (unreachable, malformed)."""


# --- the spec, as the policy sees it -----------------------------------------------------------


def policy_spec(spec: DiffusionServiceSpec) -> PolicySpec:
    """The pure policy's view of a DiffusionService spec."""
    loop = spec.control_loop
    slo_latency = spec.slo.latency_seconds
    return PolicySpec(
        slo=SloSpec(latency_s=slo_latency, percentile=spec.slo.percentile / 100.0),
        pools=tuple(
            PoolSpec(
                name=p.name,
                price_per_hour=p.price_per_hour,
                throughput_rps_per_replica=p.throughput_per_replica or DEFAULT_THROUGHPUT_RPS,
                latency_s=slo_latency * DEFAULT_LATENCY_SHARE,
                provision_s=loop.provisioning_seconds,
                min_replicas=p.min_replicas,
                max_replicas=p.max_replicas,
            )
            for p in spec.pools
        ),
        mode=spec.mode,
        control=ControlSettings(
            interval_s=loop.interval_seconds,
            dwell_s=loop.dwell_seconds,
            recovery_window_s=loop.recovery_window_seconds,
            stabilization_s=loop.stabilization_seconds,
        ),
    )


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolMetrics:
    requests_rps: float = 0.0
    #: The SLO-percentile request latency over the window (None: no request finished).
    latency_s: float | None = None
    queue_depth: float = 0.0


@dataclass(frozen=True)
class Metrics:
    """What the data plane reported over one window."""

    window_s: float
    pools: Mapping[str, PoolMetrics] = field(default_factory=dict)

    @property
    def arrival_rps(self) -> float:
        return sum(p.requests_rps for p in self.pools.values())


@dataclass(frozen=True)
class WorkerSample:
    """One scrape of one worker: cumulative counters and current gauges."""

    requests_total: float
    #: Request-latency histogram summed over kinds: (upper bound, cumulative count), ascending.
    latency_buckets: tuple[tuple[float, float], ...]
    queue_depth: float


def parse_worker_metrics(text: str) -> WorkerSample:
    """Read a worker's `/metrics` (Prometheus text format); raises ObservationError if malformed."""
    requests = 0.0
    buckets: dict[float, float] = {}
    queue = 0.0
    seen = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if sample.name == worker_metrics.REQUESTS:
                    requests += value
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
    if any(not math.isfinite(v) or v < 0 for v in (requests, queue, *buckets.values())):
        raise ObservationError("worker metrics hold negative or non-finite values")
    return WorkerSample(requests, tuple(sorted(buckets.items())), queue)


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
        queue = 0.0
        merged: dict[float, float] = {}
        for pod in pods:
            now, before = current[pod], previous.get(pod)
            queue += now.queue_depth
            if before is None:
                continue
            requests += _increase(now.requests_total, before.requests_total)
            old = dict(before.latency_buckets)
            for le, count in now.latency_buckets:
                merged[le] = merged.get(le, 0.0) + _increase(count, old.get(le))
        out[pool] = PoolMetrics(
            requests_rps=requests / window_s,
            latency_s=histogram_quantile(quantile, sorted(merged.items())),
            queue_depth=queue,
        )
    return Metrics(window_s=window_s, pools=out)


def prometheus_window(interval_s: float) -> float:
    return max(interval_s, MIN_PROMETHEUS_WINDOW_S)


def prometheus_queries(namespace: str, service: str, window_s: float, quantile: float) -> dict[str, str]:
    """PromQL for the loop: per-pool request rate, latency quantile and queue depth."""
    selector = f'namespace="{namespace}",service=~"{service}-.+"'
    window = f"{max(1, round(window_s))}s"
    return {
        "requests": f"sum by (pool) (rate({worker_metrics.REQUESTS}{{{selector}}}[{window}]))",
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
    """Metrics from the decoded answers to `prometheus_queries` (same keys)."""
    requests = _vector(answers.get("requests"), "requests")
    latency = _vector(answers.get("latency"), "latency")
    queue = _vector(answers.get("queue"), "queue")
    for what, values in (("requests", requests), ("queue", queue)):
        if any(v < 0 or math.isinf(v) for v in values.values()):
            raise ObservationError(f"Prometheus {what} query gave a negative or infinite value")
    out = {}
    for pool in pools:
        lat = latency.get(pool)
        out[pool] = PoolMetrics(
            requests_rps=requests.get(pool, 0.0),
            latency_s=lat if lat is not None and math.isfinite(lat) and lat >= 0 else None,
            queue_depth=queue.get(pool, 0.0),
        )
    return Metrics(window_s=window_s, pools=out)


# --- capacity -------------------------------------------------------------------------------


def parse_time(value: Any) -> float | None:
    """Epoch seconds of a Kubernetes timestamp (`...Z`, with or without fractions)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_times(event: Mapping[str, Any]) -> tuple[float | None, float | None]:
    meta = event.get("metadata") or {}
    first = parse_time(event.get("firstTimestamp")) or parse_time(event.get("eventTime")) or parse_time(
        meta.get("creationTimestamp")
    )
    last = (
        parse_time(event.get("lastTimestamp"))
        or parse_time((event.get("series") or {}).get("lastObservedTime"))
        or parse_time(event.get("eventTime"))
        or first
    )
    return first, last


def _claim_nodepool(claim: str, labels: Mapping[str, str], nodepools: Iterable[str]) -> str | None:
    if labels.get(KARPENTER_NODEPOOL_LABEL):
        return labels[KARPENTER_NODEPOOL_LABEL]
    matches = [np for np in nodepools if claim.startswith(np + "-")]
    return max(matches, key=len) if matches else None


def shortages_from_events(
    events: Iterable[Mapping[str, Any]],
    nodeclaims: Iterable[Mapping[str, Any]],
    nodepools: Mapping[str, str],
    now_s: float,
    window_s: float,
) -> dict[str, float]:
    """pool -> since when Karpenter could not launch its nodes (events seen within `window_s`).

    `nodepools` maps pool -> its NodePool's name; pools without one have no such signal.
    """
    pool_of = {np: pool for pool, np in nodepools.items()}
    claim_labels = {
        (c.get("metadata") or {}).get("name", ""): (c.get("metadata") or {}).get("labels") or {} for c in nodeclaims
    }
    out: dict[str, float] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") != INSUFFICIENT_CAPACITY_REASON or involved.get("kind") != "NodeClaim":
            continue
        claim = involved.get("name") or ""
        nodepool = _claim_nodepool(claim, claim_labels.get(claim, {}), pool_of)
        pool = pool_of.get(nodepool or "")
        first, last = _event_times(event)
        if pool is None or last is None or last < now_s - window_s:
            continue
        since = min(first if first is not None else last, last)
        out[pool] = min(out.get(pool, since), since)
    return out


def _unschedulable_since(pod: Mapping[str, Any]) -> float | None:
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return parse_time(c.get("lastTransitionTime")) or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    return None


def pod_pool(pod: Mapping[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_POOL)


def shortages_from_pods(pods: Iterable[Mapping[str, Any]], now_s: float, grace_s: float) -> dict[str, float]:
    """pool -> since when its oldest pod has been Unschedulable, counting only pods past the grace."""
    out: dict[str, float] = {}
    for pod in pods:
        pool, since = pod_pool(pod), _unschedulable_since(pod)
        if pool is None or since is None or now_s - since < grace_s:
            continue
        out[pool] = min(out.get(pool, since), since)
    return out


#: Container states that will not clear by themselves: the pod is scheduled but gives no capacity.
STUCK_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName",
     "CreateContainerError", "RunContainerError"}
)


def _unready_since(pod: Mapping[str, Any]) -> tuple[float, bool] | None:
    """(since when a scheduled pod has not been Ready, whether a container is stuck), or None if ready/unscheduled."""
    status = pod.get("status") or {}
    if pod_ready(pod) or status.get("phase") not in ("Pending", "Running"):
        return None
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") != "True":
        return None  # not placed yet: the Unschedulable signal covers it
    ready = conditions.get("Ready") or {}
    since = (parse_time(ready.get("lastTransitionTime")) or parse_time(scheduled.get("lastTransitionTime"))
             or parse_time((pod.get("metadata") or {}).get("creationTimestamp")))
    if since is None:
        return None
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    stuck = any(((c.get("state") or {}).get("waiting") or {}).get("reason") in STUCK_REASONS for c in containers)
    return since, stuck


def shortages_from_unready_pods(
    pods: Iterable[Mapping[str, Any]], now_s: float, stuck_grace_s: float, readiness_timeout_s: float
) -> dict[str, float]:
    """pool -> since when a scheduled pod has failed to become Ready.

    Scheduled pods that never turn Ready give a pool no capacity, like pods that cannot be
    placed: a crash loop or an image that cannot be pulled counts after `stuck_grace_s`; a
    pod that runs but stays un-ready (a model that fails to load keeps the worker up with
    /readyz at 503) counts after `readiness_timeout_s`, which must cover a normal model load
    (0 turns this second signal off).
    """
    out: dict[str, float] = {}
    for pod in pods:
        pool, found = pod_pool(pod), _unready_since(pod)
        if pool is None or found is None:
            continue
        since, stuck = found
        waited = now_s - since
        if (stuck and waited >= stuck_grace_s) or (readiness_timeout_s > 0 and waited >= readiness_timeout_s):
            out[pool] = min(out.get(pool, since), since)
    return out


def merge_shortages(*sources: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for source in sources:
        for pool, since in source.items():
            out[pool] = min(out.get(pool, since), since)
    return out


def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def _worker_url(pod: Mapping[str, Any], path: str) -> str | None:
    """`path` on a worker pod (its container port named `http`), or None without a pod IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = names.WORKER_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                port = int(p["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


def scrape_url(pod: Mapping[str, Any]) -> str | None:
    """Where a ready worker pod serves `/metrics`."""
    return _worker_url(pod, "/metrics") if pod_ready(pod) else None


def readyz_url(pod: Mapping[str, Any]) -> str | None:
    """Where a running but un-ready worker pod says why on `/readyz` (loading, or failed and why)."""
    if (pod.get("status") or {}).get("phase") != "Running" or pod_ready(pod):
        return None
    return _worker_url(pod, "/readyz")


# --- model loads ----------------------------------------------------------------------------

#: Longest worker error kept per pool (a condition holds every pool's; an Event 1 KiB).
MAX_LOAD_ERROR_CHARS = 900


@dataclass(frozen=True)
class LoadFailure:
    """A pool whose workers gave up loading the model: their `/readyz` answered `failed`.

    Such a worker stays up (for diagnosis) but will never serve: a configuration error (a
    family that does not match the checkpoint, a missing revision) that only a spec change
    fixes, so the pool counts as short at once rather than after `readinessTimeoutSeconds`.
    """

    pool: str
    #: The workers' distinct messages (`FamilyMismatch: ...`), sorted.
    errors: tuple[str, ...]
    #: The pods that answered `failed`, sorted.
    pods: tuple[str, ...]
    #: Since when the longest-failing of them has not been Ready.
    since_s: float

    @property
    def message(self) -> str:
        return "; ".join(self.errors)


def readyz_failure(status_code: int, body: str) -> str | None:
    """The worker's error if a `/readyz` answer says the model load failed, else None.

    The body is `{"status": "loading"|"failed"|"ready", "error": str|None}`; anything else
    (a proxy's page, a worker too old to say) is no evidence of a failure and is ignored:
    the pod still counts as short after `readinessTimeoutSeconds`.
    """
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    if not isinstance(decoded, Mapping) or decoded.get("status") != "failed":
        return None
    error = decoded.get("error")
    text = error.strip() if isinstance(error, str) else ""
    text = text or f"model load failed (HTTP {status_code}, no reason given)"
    return text if len(text) <= MAX_LOAD_ERROR_CHARS else text[: MAX_LOAD_ERROR_CHARS - 1] + "…"


def load_failures(
    answers: Mapping[str, tuple[int, str] | None], pods: Iterable[Mapping[str, Any]], now_s: float
) -> dict[str, LoadFailure]:
    """pool -> its failed model loads, from `/readyz` answers by pod name (None: no answer)."""
    found: dict[str, list[tuple[str, str, float]]] = {}
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name")
        pool, answer = pod_pool(pod), answers.get(name or "")
        if pool is None or answer is None:
            continue
        error = readyz_failure(*answer)
        if error is None:
            continue
        unready = _unready_since(pod)
        found.setdefault(pool, []).append((name or "", error, unready[0] if unready else now_s))
    return {
        pool: LoadFailure(
            pool=pool,
            errors=tuple(sorted({e for _, e, _ in items})),
            pods=tuple(sorted(n for n, _, _ in items)),
            since_s=min(s for _, _, s in items),
        )
        for pool, items in found.items()
    }


# --- the observation ------------------------------------------------------------------------


def build_observation(
    now_s: float,
    pools: Sequence[str],
    deployments: Mapping[str, Mapping[str, Any] | None],
    demand: tuple[float, float],
    metrics: Metrics,
    shortages: Mapping[str, float],
) -> Observation:
    """The policy's input: replica counts from Deployments, demand, measurements, shortages."""
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
    rate, trend = demand
    return Observation(now_s=now_s, arrival_rps=rate, arrival_trend_rps_per_s=trend, pools=tuple(observed))
