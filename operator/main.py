"""`stepfleet operator`: run the reconciler against the current cluster.

Runs kopf in standalone mode (one active replica; the chart deploys one with a Recreate
strategy), with a liveness endpoint kopf keeps fresh while its event loop is healthy, and
the control loop's Prometheus metrics on a second port (`--metrics`; kopf's liveness server
serves only its own path). The chart names these ports `liveness` and `metrics`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from urllib.parse import urlsplit

import kopf

from stepfleet.operator import handlers, kube
from stepfleet.operator.loop.metrics import LoopMetrics


def build_registry(config: handlers.OperatorConfig, metrics_at: tuple[str, int] | None = None) -> kopf.OperatorRegistry:
    """The handlers; `metrics_at` (host, port) serves the default Prometheus registry once kopf starts."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        handlers.configure(settings, config)
        if metrics_at is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_at[1], addr=metrics_at[0])

    handlers.register(registry, kube.Client.from_environment, config)
    return registry


def metrics_address(url: str) -> tuple[str, int]:
    """(host, port) of a `--metrics` URL, http://HOST:PORT/metrics (the server answers any path)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None or parts.path not in ("", "/metrics"):
        raise ValueError(f"--metrics wants http://HOST:PORT/metrics, not {url!r}")
    return parts.hostname, parts.port


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stepfleet operator", description="Reconcile DiffusionServices.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL (empty to disable)"
    )
    parser.add_argument(
        "--metrics", default="http://0.0.0.0:8081/metrics",
        help="serve the control loop's Prometheus metrics at this URL (empty to disable)",
    )
    parser.add_argument("--retry-backoff", type=float, default=10.0, help="seconds before a failed reconcile retries")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics_at = None
    if args.metrics:
        try:
            metrics_at = metrics_address(args.metrics)
        except ValueError as exc:
            parser.error(str(exc))
    # The loop's gauges live on the default registry, which the metrics server exposes.
    config = handlers.OperatorConfig(
        retry_backoff_s=args.retry_backoff, loop_metrics=LoopMetrics() if metrics_at else None
    )
    kopf.run(
        registry=build_registry(config, metrics_at),
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0
