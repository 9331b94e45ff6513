"""The kopf timer: every `spec.controlLoop.intervalSeconds`, observe, decide, act, report.

kopf fixes a timer's interval when the handler is registered, but the interval here is per
object and may change with the spec, so the timer ticks at a short fixed period and a tick
runs the loop only when the object's own interval has passed since its last run.

One run (`run_once`):
  1. skip unless the spec is valid and the reconcile has handled this generation (a kopf
     timer may fire before `on.create` finished; the children must exist first);
  2. observe: Deployments, worker pods, Karpenter Events (`sources`), metrics from
     Prometheus or from the pods' `/metrics`, the `/readyz` of running but un-ready pods
     (a `failed` model load), all turned into an `Observation` (`observe`);
  3. `decide` (the pure policy the simulator runs);
  4. write `status` (mode, weights, cost, reasons, CapacityShort, Degraded/ModelLoadFailed),
     post a `ModeChanged` Event on a switch and a `ModelLoadFailed` Warning per newly failing
     pool, then patch replicas, router weights and NodePool limits (`act`).
     Status goes first: the Deployment patches wake the reconcile's status refresh, which
     must then read the new mode and weights, not the old ones.
     The loop's gauges (`metrics.LoopMetrics`: mode, cost, replicas, capacity short) are set
     from the same plan once it is decided.

Never raises: a failed observation keeps the last plan (nothing is written but a
`Degraded` condition saying why, and a Warning Event when it starts); a failed write is
reported the same way and retried at the next interval. kopf's own error handling would
back off for a minute and lose the in-memory loop state in between.

What the loop remembers lives in kopf's per-object `memo` (`LoopMemory`: policy state,
last plan, demand samples, last scrapes); what must survive a restart — the mode, since
when, and the pools remembered short — is written to `status.controlLoop` and read back on
the first run.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf
from prometheus_client import CollectorRegistry

from stepfleet.operator import applying, compilation, kube, names
from stepfleet.operator import conditions as cond
from stepfleet.operator.models import API_GROUP, API_VERSION, PLURAL, DiffusionServiceSpec
from stepfleet.operator.policy import Plan, Signals, StepMemory, control_step
from stepfleet.operator.reconcile import owner_of
from stepfleet.operator.validation import validate

from . import act, capacity, observe, pods, prometheus, scraping, sources
from .alarms import LossWatch
from .errors import ObservationError
from .measured import Metrics
from .metrics import LoopMetrics
from .specmap import policy_spec

log = logging.getLogger(__name__)

MEMO_KEY = "stepfleet_control_loop"


@dataclass
class LoopMemory:
    """Per-object loop state kept between runs (in kopf's memo): the control step's memory
    (None until the first run reads back what `status` remembers) and the last scrapes."""

    step: StepMemory | None = None
    scrapes: dict[str, scraping.WorkerSample] = field(default_factory=dict)
    scraped_at: float | None = None
    #: time.monotonic() of the last run (for the per-object interval).
    last_run: float | None = None

    @property
    def plan(self) -> Plan | None:
        return self.step.plan if self.step is not None else None


@dataclass(frozen=True)
class Outcome:
    """What one run did (for logs and tests)."""

    decided: bool = False
    plan: Plan | None = None
    changes: tuple[str, ...] = ()
    error: str | None = None
    note: str = ""


def _measure(
    http: httpx.Client,
    spec: DiffusionServiceSpec,
    namespace: str,
    name: str,
    cluster: sources.ClusterView,
    memory: LoopMemory,
    now_s: float,
) -> Metrics | None:
    """This window's metrics, or None while scraping has only one sample yet."""
    pools = [p.name for p in spec.pools]
    quantile = spec.slo.percentile / 100.0
    url = spec.control_loop.prometheus_url
    if url:
        window = prometheus.prometheus_window(spec.control_loop.interval_seconds)
        answers = sources.query_prometheus(http, url, prometheus.prometheus_queries(namespace, name, window, quantile))
        return prometheus.metrics_from_prometheus(answers, pools, window)
    targets: dict[str, str] = {}
    pod_pools: dict[str, str] = {}
    for pod in cluster.pods:
        target, pool = pods.scrape_url(pod), pods.pod_pool(pod)
        if target and pool in pools:
            pod_name = pod["metadata"]["name"]
            targets[pod_name], pod_pools[pod_name] = target, pool
    current = {pod: scraping.parse_worker_metrics(text) for pod, text in sources.scrape(http, targets).items()}
    previous, previous_at = memory.scrapes, memory.scraped_at
    memory.scrapes, memory.scraped_at = current, now_s
    if previous_at is None:
        return None
    return scraping.metrics_from_scrapes(previous, current, pod_pools, pools, now_s - previous_at, quantile)


def _load_failures(
    http: httpx.Client, spec: DiffusionServiceSpec, cluster: sources.ClusterView, now_s: float
) -> dict[str, capacity.LoadFailure]:
    """Pools whose running but un-ready workers say on `/readyz` that loading the model failed."""
    pools = {p.name for p in spec.pools}
    targets = {
        pod["metadata"]["name"]: url
        for pod in cluster.pods
        if pods.pod_pool(pod) in pools and (url := pods.readyz_url(pod))
    }
    return capacity.load_failures(sources.probe_readyz(http, targets), cluster.pods, now_s)


def run_once(
    client: kube.Client,
    http: httpx.Client,
    body: Mapping[str, Any],
    memory: LoopMemory,
    *,
    now: dt.datetime,
    stopping: Callable[[], bool] = lambda: False,
    gauges: LoopMetrics | None = None,
) -> Outcome:
    """One observe-decide-act pass; `stopping()` true (operator exiting) skips the writes.

    `gauges`, when given, get each decision's mode, cost, replicas and short pools.
    """
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        if gauges is not None:
            gauges.forget(meta["namespace"], meta["name"])
        return Outcome(note="being deleted")
    spec, _ = validate(meta["name"], body.get("spec"))
    if spec is None:
        return Outcome(note="invalid spec: the reconcile reports it")
    status = dict(body.get("status") or {})
    generation = meta.get("generation")
    if status.get("observedGeneration") != generation:
        return Outcome(note="waiting for the reconcile of this generation")
    owner = owner_of(body)
    now_s = now.timestamp()
    if memory.step is None:
        memory.step = StepMemory(state=act.state_from_status(status))
    loop = spec.control_loop

    try:
        cluster = sources.read_cluster(client, owner, spec)
        load_failures = _load_failures(http, spec, cluster, now_s)
        metrics = _measure(http, spec, owner.namespace, owner.name, cluster, memory, now_s)
        if metrics is None:
            return Outcome(note="first scrape taken; rates need a second")
        nodepools = {
            p.name: names.nodepool(owner.namespace, owner.name, p.name) for p in spec.pools if p.node_pool
        }
        shortages = capacity.merge_shortages(
            capacity.shortages_from_events(
                cluster.capacity_events, cluster.nodeclaims, nodepools, now_s,
                max(loop.pending_grace_seconds, 2 * loop.interval_seconds),
            ),
            capacity.shortages_from_pods(cluster.pods, now_s, loop.pending_grace_seconds),
            capacity.shortages_from_unready_pods(cluster.pods, now_s, loop.pending_grace_seconds,
                                                 loop.readiness_timeout_seconds,
                                                 compilation.readiness_timeouts(spec)),
            # A failed model load will not heal by itself: short at once, not after the timeout.
            {pool: failure.since_s for pool, failure in load_failures.items()},
        )
        signals = Signals(
            arrival_rps=metrics.arrival_rps, window_s=metrics.window_s, video_rps=metrics.video_rps,
            pools=observe.pool_observations([p.name for p in spec.pools], cluster.deployments, metrics, shortages),
        )
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, keep the last plan and say why
        message = str(exc) if isinstance(exc, ObservationError) else f"{type(exc).__name__}: {exc}"
        _report_failure(client, body, status, cond.REASON_OBSERVATION_FAILED, message, now)
        return Outcome(error=message, plan=memory.plan)

    previous = memory.step
    plan, step = control_step(previous, signals, policy_spec(spec), now_s)
    if plan is None:
        return Outcome(note="no rate measured yet")
    state = step.state
    # The policy's own signal (a sudden loss of ready replicas) counts as a shortage too.
    shortages = capacity.merge_shortages(shortages, dict(plan.short))
    if stopping():
        return Outcome(plan=memory.plan, note="operator stopping: plan not applied")
    if gauges is not None:
        gauges.record(
            owner.namespace, owner.name, mode=plan.mode, cost_per_hour=plan.cost_per_hour,
            replicas={p.name: plan.replicas[p.name] for p in spec.pools}, short=shortages,
        )
    new_status = act.decided_status(
        status, spec, plan, state, demand_rps=step.demand_rps, shortages=shortages, generation=generation, now=now,
        load_failures=load_failures,
    )
    try:
        client.patch(kube.DIFFUSIONSERVICE, owner.namespace, owner.name, {"status": new_status}, subresource="status")
        if plan.mode_changed:
            _post(client, act.mode_event(meta, previous.state.mode, plan, now))
        for pool in plan.newly_lost:
            _post(client, act.capacity_lost_event(meta, pool, plan, now))
        for event in act.load_failure_events(meta, status, load_failures, now):
            _post(client, event)
        changes = act.apply_plan(client, owner, spec, plan, cluster.deployments, now_s=now.timestamp())
    except (kube.ApiError, applying.ChildConflict) as exc:
        memory.step = step
        if isinstance(exc, kube.ApiError) and exc.status == 409:
            # A child (or the spec) changed since this run read it: a requeue, not a failure.
            return Outcome(decided=True, plan=plan, note=f"children changed meanwhile, acting next run: {exc}")
        message = f"acting on the plan failed: {exc}"
        _report_failure(client, body, {**status, **new_status}, cond.REASON_ACTION_FAILED, message, now)
        memory.step = step
        return Outcome(decided=True, plan=plan, error=message)
    memory.step = step
    return Outcome(decided=True, plan=plan, changes=tuple(changes))


def _post(client: kube.Client, event: dict[str, Any]) -> None:
    try:
        client.post_event(event)
    except kube.ApiError as exc:
        log.warning("could not post event %s: %s", event.get("reason"), exc)


def _report_failure(
    client: kube.Client, body: Mapping[str, Any], status: Mapping[str, Any], reason: str, message: str, now: dt.datetime
) -> None:
    meta = body["metadata"]
    log.warning("control loop of %s/%s: %s", meta.get("namespace"), meta.get("name"), message)
    new = act.failed_status(status, reason, message, generation=meta.get("generation"), now=now)
    try:
        client.patch(kube.DIFFUSIONSERVICE, meta["namespace"], meta["name"], {"status": new}, subresource="status")
    except kube.ApiError as exc:
        log.warning("could not report the failure in status: %s", exc)
        return
    if act.newly_degraded(status, new, reason):
        _post(client, act.failure_event(meta, reason, message, now))


def interval_of(body: Mapping[str, Any]) -> float:
    """The object's loop interval, read leniently (validation happens in the run)."""
    try:
        value = float(((body.get("spec") or {}).get("controlLoop") or {}).get("intervalSeconds", 30))
    except (TypeError, ValueError):
        return 30.0
    return value if value > 0 else 30.0


def register(
    registry: kopf.OperatorRegistry,
    client: Callable[[], kube.Client],
    *,
    tick_s: float = 1.0,
    http_timeout_s: float = 5.0,
    metrics: LoopMetrics | None = None,
    losses: LossWatch | None = None,
) -> None:
    """Register the control-loop timer (and the cleanup of its HTTP client) on `registry`.

    `metrics` receives each decision (`stepfleet operator` passes the gauges it serves);
    without one the loop keeps its gauges on a private, unserved registry. `losses` (fed by
    the Deployment watch) makes a run start at the next tick when a pool lost ready replicas.
    """
    gauges = metrics if metrics is not None else LoopMetrics(registry=CollectorRegistry())
    http_box: list[httpx.Client] = []

    def http() -> httpx.Client:
        if not http_box:
            http_box.append(httpx.Client(timeout=http_timeout_s))
        return http_box[0]

    @kopf.timer(API_GROUP, API_VERSION, PLURAL, registry=registry, interval=tick_s, sharp=False)
    def control_loop(body: kopf.Body, memo: kopf.Memo, stopped: Any, logger: logging.Logger, **_: Any) -> None:
        memory = memo.get(MEMO_KEY)
        if memory is None:
            memory = memo[MEMO_KEY] = LoopMemory()
        started = time.monotonic()
        meta = body.get("metadata") or {}
        alarmed = losses is not None and losses.take((meta.get("namespace", ""), meta.get("name", "")))
        if memory.last_run is not None and started - memory.last_run < interval_of(body) - tick_s / 2 and not alarmed:
            return
        if alarmed:
            logger.info("control loop: a pool lost ready replicas, running now")
        memory.last_run = started
        try:
            outcome = run_once(
                client(), http(), body, memory, now=dt.datetime.now(dt.timezone.utc), stopping=lambda: bool(stopped),
                gauges=gauges,
            )
        except Exception:  # noqa: BLE001 - a bug here must not stop the loop or trigger kopf's backoff
            logger.exception("control loop run failed")
            return
        if outcome.changes:
            logger.info("control loop: %s", "; ".join(outcome.changes))
        elif outcome.note:
            logger.debug("control loop: %s", outcome.note)

    @kopf.on.cleanup(registry=registry)
    def close_http(**_: Any) -> None:
        while http_box:
            http_box.pop().close()
