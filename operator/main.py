"""`stepfleet operator`: run the reconciler against the current cluster.

Runs kopf in standalone mode (one active replica; the chart deploys one with a Recreate
strategy), with a liveness endpoint kopf keeps fresh while its event loop is healthy.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import kopf

from stepfleet.operator import handlers, kube


def build_registry(config: handlers.OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        handlers.configure(settings, config)

    handlers.register(registry, kube.Client.from_environment, config)
    return registry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stepfleet operator", description="Reconcile DiffusionServices.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL (empty to disable)"
    )
    parser.add_argument("--retry-backoff", type=float, default=10.0, help="seconds before a failed reconcile retries")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = handlers.OperatorConfig(retry_backoff_s=args.retry_backoff)
    kopf.run(
        registry=build_registry(config),
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0
