"""`stepfleet worker` and `stepfleet model`: the data plane's command-line entry points."""

from __future__ import annotations

import argparse
import logging
import sys


def worker_main(argv: list[str]) -> int:
    from stepfleet.serving.settings import WorkerSettings

    ap = argparse.ArgumentParser(prog="stepfleet worker", description="Serve a diffusion model over HTTP.")
    ap.add_argument("--model", default="tiny-sd", help="built-in name, local directory or hub id")
    ap.add_argument("--served-model-name", default=None, help="name clients send as `model`")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--device", default="auto", help="auto, cuda, neuron, xla or cpu")
    ap.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    ap.add_argument("--local-files-only", action="store_true", default=None,
                    help="never contact a model hub (also implied by HF_HUB_OFFLINE=1)")
    ap.add_argument("--pool", default="local", help="pool name used as the `pool` metric label")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--max-batch", type=int, default=4, help="images per denoising step")
    ap.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 429")
    ap.add_argument("--policy", default="continuous", choices=["continuous", "static"])
    ap.add_argument("--aux", default="auto", choices=["auto", "inline", "thread"],
                    help="where prompt encoding and VAE decoding run (auto: between steps on the CPU)")
    ap.add_argument("--no-preemption", dest="preemption", action="store_false")
    ap.add_argument("--max-image-size", type=int, default=1024)
    ap.add_argument("--default-steps", type=int, default=20)
    ap.add_argument("--template-cache-bytes", type=int, default=2 * 1024**3,
                    help="host memory for template activations (edits); least recently used spill or go")
    ap.add_argument("--template-disk-bytes", type=int, default=0,
                    help="disk for spilled template activations (0: no disk tier)")
    ap.add_argument("--template-dir", default=None, help="spill directory (default: a temporary one)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--graceful-shutdown-s", type=float, default=60.0)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = WorkerSettings(
            **{k: v for k, v in vars(args).items() if k not in ("log_level",) and v is not None}
        )
    except Exception as exc:
        print(f"stepfleet worker: invalid settings: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from stepfleet.serving.app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
    )
    return 0


def model_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stepfleet model", description="Write a built-in model to a directory.")
    ap.add_argument("name", choices=["tiny-sd", "sd15-random"])
    ap.add_argument("--out", required=True, help="directory to write (save_pretrained layout)")
    args = ap.parse_args(argv)
    from stepfleet.serving.builtin_models import build_builtin
    from stepfleet.serving.loading import quiet_libraries

    quiet_libraries()
    path = build_builtin(args.out, args.name)
    print(path)
    return 0
