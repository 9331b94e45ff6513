"""`stepfleet bench NAME`: benchmarks print JSON on stdout and a human summary on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stepfleet bench", description="Run a benchmark and print its figures.")
    sub = ap.add_subparsers(dest="name", required=True)
    eng = sub.add_parser("engine", help="continuous vs static vs peer-style dynamic batching vs one-at-a-time")
    eng.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    eng.add_argument("--quick", action="store_true", help="fewer live requests, live only at load 1.2 (< 3 min)")
    eng.add_argument("--model", default="tiny-sd")
    eng.add_argument("--device", default="auto")
    eng.add_argument("--dtype", default="auto")
    eng.add_argument("--size", type=int, default=256)
    eng.add_argument("--max-batch", type=int, default=4)
    eng.add_argument("--live-requests", type=int, default=None)
    eng.add_argument("--seed", type=int, default=7)
    eng.add_argument("--live-loads", default=None,
                     help="comma-separated loads to also run live (default 0.7,1.2,2.0; --quick: 1.2)")
    eng.add_argument("--noise", action="store_true",
                     help="run a CPU-bound competing process on one core during the live runs")
    rtr = sub.add_parser("router", help="router added latency on loopback; predicted vs round-robin vs least-requests")
    rtr.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    rtr.add_argument("--quick", action="store_true", help="fewer segments and a shorter simulation (< 2 min)")
    edt = sub.add_parser("edit", help="edits on cached template activations vs full-compute inpainting")
    edt.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    edt.add_argument("--quick", action="store_true", help="fewer repeats and live requests")
    edt.add_argument("--model", default="tiny-sd")
    edt.add_argument("--size", type=int, default=512)
    edt.add_argument("--steps", type=int, default=10)
    edt.add_argument("--max-batch", type=int, default=4)
    edt.add_argument("--live-requests", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.name == "router":
        from stepfleet.serving.bench import router_bench

        result = router_bench.run(quick=args.quick)
        print(router_bench.summary(result), file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0

    if args.name == "edit":
        from stepfleet.serving.bench import edit_bench

        ecfg = edit_bench.EditBenchConfig(
            model=args.model, size=args.size, steps=args.steps, max_batch=args.max_batch,
            reps=3 if args.quick else 5, cost_reps=2 if args.quick else 3,
            live_requests=args.live_requests or (6 if args.quick else 16),
            replay_requests=1000 if args.quick else 2000,
        )
        result = edit_bench.run(ecfg, quick=args.quick)
        print(edit_bench.summary(result), file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0

    from stepfleet.serving.bench.engine_bench import BenchConfig, run, summary

    cfg = BenchConfig(
        model=args.model, device=args.device, dtype=args.dtype, size=args.size, max_batch=args.max_batch,
        seed=args.seed, noise=args.noise,
        live_requests=args.live_requests or (12 if args.quick else 40),
        live_loads=(tuple(float(x) for x in args.live_loads.split(",")) if args.live_loads
                    else (1.2,) if args.quick else (0.7, 1.2, 2.0)),
        replay_requests=1000 if args.quick else 2000,
    )
    result = run(cfg, quick=args.quick)
    print(summary(result), file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
