"""`stepfleet router --config FILE`: run the router (FastAPI under uvicorn)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stepfleet router",
                                 description="OpenAI-compatible front door that routes image requests to worker pools.")
    ap.add_argument("--config", required=True, help="router.yaml (the operator's ConfigMap format); re-read on change")
    ap.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 in a container")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--policy", default="predicted", choices=["predicted", "least_requests", "round_robin"],
                    help="choice of worker within a pool")
    ap.add_argument("--discovery", default="auto", choices=["auto", "static", "kubernetes"],
                    help="workers from the file only, or from the pool Services' EndpointSlices (auto: in a cluster)")
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--upstream-timeout-s", type=float, default=300.0)
    ap.add_argument("--connect-timeout-s", type=float, default=2.0)
    ap.add_argument("--eject-s", type=float, default=5.0)
    ap.add_argument("--load-poll-s", type=float, default=1.0)
    ap.add_argument("--load-poll-timeout-s", type=float, default=2.0,
                    help="a worker's /v1/load poll unanswered this long is silent")
    ap.add_argument("--hang-polls", type=int, default=2,
                    help="silent polls in a row that mark a worker unresponsive (until it answers again)")
    ap.add_argument("--reload-s", type=float, default=1.0)
    ap.add_argument("--max-inflight-per-worker", type=int, default=128)
    ap.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--max-json-bytes", type=int, default=1024 * 1024)
    ap.add_argument("--default-steps", type=int, default=20, help="workers' default steps (for cost prediction)")
    ap.add_argument("--default-size", type=int, default=512, help="workers' default image side (for cost prediction)")
    ap.add_argument("--api-keys-file", default=None,
                    help="one key per line (optionally tenant=NAME rps=N burst=N); unset = open")
    ap.add_argument("--worker-token-file", default=None,
                    help="token sent to workers (default: $STEPFLEET_WORKER_TOKEN; neither: none)")
    ap.add_argument("--rate-limit-rps", type=float, default=None, help="default per-key request rate")
    ap.add_argument("--rate-limit-burst", type=float, default=None)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--no-access-log", dest="access_log", action="store_false",
                    help="drop the per-request log line (request id, pool, status, latency)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.access_log:
        logging.getLogger("stepfleet.router.access").setLevel(logging.WARNING)

    from stepfleet.serving.router.config import ConfigError, RouterSettings, load_config

    try:
        config = load_config(args.config)
    except (OSError, ConfigError) as exc:
        print(f"stepfleet router: {exc}", file=sys.stderr)
        return 2
    skip = {"config", "log_level", "access_log"}
    try:
        settings = RouterSettings(**{k: v for k, v in vars(args).items() if k not in skip and v is not None})
    except Exception as exc:
        print(f"stepfleet router: invalid settings: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from stepfleet.serving.router.app import create_app
    from stepfleet.serving.router.discovery import make_discovery

    try:
        app = create_app(config, settings, config_path=args.config, discovery=make_discovery(settings.discovery, config))
    except Exception as exc:  # e.g. an unreadable API keys file
        print(f"stepfleet router: {exc}", file=sys.stderr)
        return 2
    # uvicorn's own access log is off: ours carries the request id and the pool.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0
