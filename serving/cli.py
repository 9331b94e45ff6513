"""`stepfleet worker` and `stepfleet model`: the data plane's command-line entry points."""

from __future__ import annotations

import argparse
import logging
import sys


def worker_main(argv: list[str]) -> int:
    from stepfleet.serving.settings import InvalidSettings, WorkerSettings

    # `--log-level` is the process's, not a setting; every other flag is `WorkerSettings`'.
    cli = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    cli.add_argument("--log-level", default="info", help="debug, info, warning or error (default: info)")
    known, rest = cli.parse_known_args(argv)
    try:
        settings = WorkerSettings.from_argv(rest, parents=[cli])
    except InvalidSettings as exc:
        print(f"stepfleet worker: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=known.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from stepfleet.serving.app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=known.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
    )
    return 0


def model_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stepfleet model", description="Write a built-in model to a directory.")
    from stepfleet.serving.builtin_models import BUILTIN_MODELS

    ap.add_argument("name", choices=BUILTIN_MODELS)
    ap.add_argument("--out", required=True, help="directory to write (save_pretrained layout)")
    args = ap.parse_args(argv)
    from stepfleet.serving.builtin_models import build_builtin
    from stepfleet.serving.loading import quiet_libraries

    quiet_libraries()
    path = build_builtin(args.out, args.name)
    print(path)
    return 0
