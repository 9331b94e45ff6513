"""kopf wiring: which events run which reconcile step, with which retry settings.

Handlers are registered on an explicit registry by `register`, not at import time, so
the CLI, tests and an embedding program each get their own operator with their own client
and settings. All handlers are sync: kopf runs them in worker threads, and the sync client
may then call an API server that shares the event loop (as the test emulator does).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import CollectorRegistry

from stepfleet.operator import conditions as cond
from stepfleet.operator import kube, loop, names, reconcile
from stepfleet.operator.loop.alarms import LossWatch
from stepfleet.operator.loop.metrics import LoopMetrics
from stepfleet.operator.models import API_GROUP, API_VERSION, PLURAL, NetworkPeer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorConfig:
    """Timing knobs; production defaults, tests shrink them."""

    #: Seconds before a failed reconcile is retried (conflicts, 5xx, timeouts).
    retry_backoff_s: float = 10.0
    #: Backoffs (seconds) of kopf's own API calls (watch, patch) after a failure.
    api_error_backoffs: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    #: Seconds before a broken watch stream is re-established.
    watch_reconnect_s: float = 1.0
    #: Server-side watch timeout (seconds); kopf re-lists after it, which heals missed events.
    watch_server_timeout_s: float | None = 300.0
    #: Threads running sync handlers.
    workers: int = 4
    #: Period (seconds) of the control-loop timer; each object's loop runs every
    #: `spec.controlLoop.intervalSeconds`, checked at this granularity.
    loop_tick_s: float = 1.0
    #: Timeout (seconds) of one HTTP call to Prometheus or a worker's /metrics.
    loop_http_timeout_s: float = 5.0
    #: The control loop's gauges (`stepfleet operator` passes the ones it serves on /metrics);
    #: None keeps them on a private registry.
    loop_metrics: LoopMetrics | None = None
    #: Pods besides each service's router that its workers' NetworkPolicy admits: the operator
    #: itself (the control loop scrapes worker pods) and the cluster's Prometheus (`--metrics-from`).
    metrics_peers: tuple[NetworkPeer, ...] = ()
    #: Whether kopf may list and watch namespaces and CRDs. Only a cluster-wide operator needs to
    #: (to find new namespaces); one given exact namespaces does without, and so does its RBAC.
    scan_cluster: bool = True


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Apply our storage and timing choices to kopf's settings."""
    settings.persistence.finalizer = names.FINALIZER
    # Handler progress in annotations only: status stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.stepfleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.stepfleet.io")
    settings.networking.error_backoffs = list(config.api_error_backoffs)
    settings.watching.reconnect_backoff = config.watch_reconnect_s
    settings.watching.server_timeout = config.watch_server_timeout_s
    settings.execution.max_workers = config.workers
    settings.scanning.disabled = not config.scan_cluster
    settings.posting.level = logging.WARNING


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _post(client: kube.Client, events: list[dict[str, Any]], logger: Any) -> None:
    """Events are best-effort: losing one must never fail or repeat a reconcile."""
    for event in events:
        try:
            client.post_event(event)
        except kube.ApiError as exc:
            logger.warning("could not post event %s: %s", event.get("reason"), exc)


def _temporary(exc: kube.ApiError, config: OperatorConfig) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"API error, will retry: {exc}", delay=config.retry_backoff_s)


def register(
    registry: kopf.OperatorRegistry,
    client_factory: Callable[[], kube.Client],
    config: OperatorConfig = OperatorConfig(),
) -> None:
    """Register the DiffusionService handlers on `registry`."""
    client_box: list[kube.Client] = []

    def client() -> kube.Client:
        if not client_box:
            client_box.append(client_factory())
        return client_box[0]

    gauges = config.loop_metrics if config.loop_metrics is not None else LoopMetrics(registry=CollectorRegistry())
    resource = dict(group=API_GROUP, version=API_VERSION, plural=PLURAL)
    common = dict(registry=registry, backoff=config.retry_backoff_s)

    @kopf.on.resume(**resource, **common)
    @kopf.on.create(**resource, **common)
    @kopf.on.update(**resource, field="spec", **common)
    def reconcile_service(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
        try:
            outcome = reconcile.reconcile(client(), body, now=_now(), metrics_peers=config.metrics_peers)
        except kube.ApiError as exc:
            if exc.retryable:
                raise _temporary(exc, config) from exc
            raise
        patch["status"] = outcome.status
        _post(client(), outcome.events, logger)
        if not outcome.valid:
            logger.warning("invalid spec: %s", outcome.events[0]["message"])
        elif outcome.changes:
            logger.info("reconciled: %s", "; ".join(outcome.changes))

    @kopf.on.delete(**resource, **common)
    def delete_service(body: kopf.Body, logger: logging.Logger, retry: int, **_: Any) -> None:
        # Whatever fails here is retried, a 403 included (an admin may grant the right): the
        # finalizer keeps the object until its NodePools are gone. A Warning says why (on the
        # first try and every tenth after, not every backoff).
        report = retry % 10 == 0
        try:
            outcome = reconcile.cleanup(client(), body, now=_now())
        except kube.ApiError as exc:
            if report:
                _post(client(), [cond.cleanup_failed_event(body["metadata"], [f"listing NodePools: {exc}"], _now())],
                      logger)
            raise _temporary(exc, config) from exc
        _post(client(), [e for e in outcome.events if report or e["reason"] != cond.REASON_CLEANUP_FAILED], logger)
        if outcome.pending:
            raise kopf.TemporaryError(f"NodePools not deleted yet: {'; '.join(outcome.pending)}",
                                      delay=config.retry_backoff_s)
        meta = body["metadata"]
        gauges.forget(meta["namespace"], meta["name"])  # kopf stops the loop's timer on deletion

    losses = LossWatch()
    loop.register(
        registry, client, tick_s=config.loop_tick_s, http_timeout_s=config.loop_http_timeout_s, metrics=gauges,
        losses=losses,
    )

    @kopf.on.event("apps", "v1", "deployments", labels={names.LABEL_MANAGED_BY: names.MANAGED_BY}, registry=registry)
    def deployment_changed(body: kopf.Body, event: dict[str, Any], logger: logging.Logger, **_: Any) -> None:
        """Keep ready counts in status current as replicas come and go (best effort), and wake
        the control loop when a pool loses ready replicas (`loop.alarms`)."""
        service = (body.get("metadata", {}).get("labels") or {}).get(names.LABEL_SERVICE)
        namespace = body.get("metadata", {}).get("namespace")
        if not service or not namespace:
            return
        if event.get("type") == "DELETED":
            losses.forget(body)
        elif losses.observe((namespace, service), body):
            logger.info("%s lost ready replicas: the control loop of %s/%s runs now",
                        body.get("metadata", {}).get("name"), namespace, service)
        try:
            reconcile.refresh_status(client(), namespace, service, now=_now())
        except kube.ApiError as exc:
            logger.debug("status refresh of %s/%s skipped: %s", namespace, service, exc)
