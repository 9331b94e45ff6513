"""`stepfleet operator`: run the reconciler against the current cluster.

Runs kopf in standalone mode (one active replica; the chart deploys one with a Recreate
strategy), with a liveness endpoint kopf keeps fresh while its event loop is healthy, and
the control loop's Prometheus metrics on a second port (`--metrics`; kopf's liveness server
serves only its own path). The chart names these ports `liveness` and `metrics`.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any
from urllib.parse import urlsplit

import kopf

from stepfleet.operator import handlers, kube
from stepfleet.operator.loop.metrics import LoopMetrics
from stepfleet.operator.models import NetworkPeer

#: Where the chart (and any pod) says which namespace the operator runs in (downward API).
NAMESPACE_ENV = "POD_NAMESPACE"


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


def metrics_peer(text: str) -> NetworkPeer:
    """`NAMESPACE[:LABEL=VALUE,...]` (a `--metrics-from` value) as a NetworkPolicy peer.

    Namespace names hold no ':', label keys may hold '/', so ':' splits and ',' separates labels.
    """
    namespace, _, labels = text.partition(":")
    pairs: dict[str, str] = {}
    for item in filter(None, labels.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metrics-from {text!r}: labels are LABEL=VALUE, comma-separated")
        pairs[key] = value
    try:
        return NetworkPeer(namespace=namespace, pod_labels=pairs)
    except ValueError as exc:
        raise ValueError(f"--metrics-from {text!r}: {exc}") from None


def watched_namespaces(given: list[str], all_namespaces: bool) -> list[str]:
    """Namespaces to watch: those given; none (every one) only with --all-namespaces; neither
    flag: the operator's own namespace ($POD_NAMESPACE, else `default`)."""
    if all_namespaces:
        return []
    return given or [os.environ.get(NAMESPACE_ENV) or "default"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stepfleet operator", description="Reconcile DiffusionServices.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="watch every namespace (default: only $POD_NAMESPACE, else `default`)")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL (empty to disable)"
    )
    parser.add_argument(
        "--metrics", default="http://0.0.0.0:8081/metrics",
        help="serve the control loop's Prometheus metrics at this URL (empty to disable)",
    )
    parser.add_argument(
        "--metrics-from", action="append", default=[], metavar="NAMESPACE[:LABEL=VALUE,...]",
        help="pods (besides the router) that every fleet's worker NetworkPolicy admits: the operator itself, "
             "Prometheus (repeatable)",
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
    try:
        peers = tuple(metrics_peer(text) for text in args.metrics_from)
    except ValueError as exc:
        parser.error(str(exc))
    namespaces = watched_namespaces(args.namespace, args.all_namespaces)
    # The loop's gauges live on the default registry, which the metrics server exposes.
    config = handlers.OperatorConfig(
        retry_backoff_s=args.retry_backoff, loop_metrics=LoopMetrics() if metrics_at else None,
        metrics_peers=peers, scan_cluster=not namespaces,
    )
    kopf.run(
        registry=build_registry(config, metrics_at),
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0
