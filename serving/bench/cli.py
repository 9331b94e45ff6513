"""`stepfleet bench NAME`: benchmarks print JSON on stdout and a human summary on stderr."""

from __future__ import annotations

import argparse
import dataclasses
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
    eng.add_argument("--compile", action="store_true",
                     help="also run the continuous engine with the denoiser compiled per row bucket (issue 20)")
    eng.add_argument("--compile-backend", default="auto", help="torch.compile backend for --compile")
    eng.add_argument("--live-rounds", type=int, default=None,
                     help="live rounds of the peer/continuous pair, in alternating order, pooled (default 2; "
                          "--quick 1)")
    eng.add_argument("--noise", action="store_true",
                     help="run a CPU-bound competing process on one core during the live runs")
    eng.add_argument("--no-live-baselines", action="store_true",
                     help="live, run only the compared pair (peer, continuous); fifo and static are still replayed")
    eng.add_argument("--slo-scale", type=float, default=None,
                     help="soft deadline of a request without deadline_ms, in solo service times (the engine's "
                          "slo_scale, default 2), live and replayed")
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
    edt.add_argument("--crop-decode", action="store_true",
                     help="decode only the mask's neighbourhood (edits.crop_decode; an approximation, off by "
                          "default as on the worker)")
    edt.add_argument("--conv-halo", type=int, default=None,
                     help="compute a UNet edit's latent-resolution convolutions only in its mask's box grown by "
                          "this many cells (edits.windowed_convs; an approximation outside the box; default off)")
    stm = sub.add_parser("stream", help="time to the first partial image vs the final one; previews' cost on the loop")
    stm.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    stm.add_argument("--quick", action="store_true", help="a short trace, one plain/streamed pair (< 2 min)")
    stm.add_argument("--model", default="tiny-sd")
    stm.add_argument("--size", type=int, default=256)
    stm.add_argument("--steps", type=int, default=20)
    stm.add_argument("--load", type=float, default=0.5, help="offered load relative to one-at-a-time service")
    stm.add_argument("--partial-images", type=int, default=3, choices=(1, 2, 3))
    stm.add_argument("--requests", type=int, default=None, help="requests per run (default 24; --quick 6)")
    stm.add_argument("--max-batch", type=int, default=4)
    stm.add_argument("--method", default="projection", choices=("projection", "vae"))
    lra = sub.add_parser("lora", help="mixed-adapter step batches vs one adapter state per batch vs merge-per-request")
    lra.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    lra.add_argument("--quick", action="store_true", help="a small size, few repeats, a short trace (< 1 min)")
    lra.add_argument("--model", default="tiny-sd")
    lra.add_argument("--size", type=int, default=None, help="image side (default 256; --quick 128)")
    lra.add_argument("--steps", type=int, default=20)
    lra.add_argument("--max-batch", type=int, default=4)
    lra.add_argument("--rank", type=int, default=16)
    lra.add_argument("--reps", type=int, default=None,
                     help="timed repeats per batch, interleaved, medians taken (default 15; --quick 2)")
    lra.add_argument("--disk-delay-ms", type=float, default=0.0,
                     help="added to each adapter file read (a slow disk or hub): time to first step, bounded vs full")
    cos = sub.add_parser("coserve", help="images and videos on one worker: stepfleet vs FIFO, SJF, static "
                                         "partitioning, no video preemption (replay on measured costs + live)")
    cos.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    cos.add_argument("--quick", action="store_true", help="small clips, a short replay, a few live requests (< 2 min)")
    cos.add_argument("--model", default="tiny-wan")
    cos.add_argument("--device", default="auto")
    cos.add_argument("--load", type=float, default=0.9, help="offered load relative to one-at-a-time capacity")
    cos.add_argument("--size", type=int, default=256, help="image and video side (larger: video denoising dominates)")
    cos.add_argument("--video-frames", type=int, default=81)
    cos.add_argument("--video-steps", type=int, default=50)
    cos.add_argument("--live-requests", type=int, default=30, help="requests of the live run (0: replay only)")
    cos.add_argument("--live-video-frames", type=int, default=21,
                     help="frames of the live run's videos (a CPU decodes them inline)")
    cos.add_argument("--slo-image-scales", type=float, nargs="+", default=[3.0, 4.0, 5.0],
                     help="image SLOs to replay, as multiples of an image's solo latency")
    cnt = sub.add_parser("controlnet", help="mixed ControlNet step batches vs batches of one ControlNet set")
    cnt.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    cnt.add_argument("--quick", action="store_true", help="a small size, few repeats, a short trace (< 1 min)")
    cnt.add_argument("--model", default="tiny-sd")
    cnt.add_argument("--size", type=int, default=256)
    cnt.add_argument("--steps", type=int, default=20)
    cnt.add_argument("--max-batch", type=int, default=4)
    from stepfleet.serving.bench import compile_bench

    compile_bench.add_parser(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.name == "compile":
        return compile_bench.main(args)

    if args.name == "coserve":
        from stepfleet.serving.bench import coserve_bench

        base = coserve_bench.CoserveBenchConfig(model=args.model, device=args.device, load=args.load, size=args.size,
                                                video_frames=args.video_frames, video_steps=args.video_steps,
                                                slo_image_scales=tuple(args.slo_image_scales),
                                                live_requests=args.live_requests,
                                                live_video_frames=args.live_video_frames)
        vcfg = (dataclasses.replace(base, reps=2, replay_requests=600, seeds=(0,),
                                    live_requests=min(8, base.live_requests),
                                    live_video_frames=min(9, base.live_video_frames or 9), full_video_decode=False) if args.quick else base)
        vresult = coserve_bench.run(vcfg, quick=args.quick)
        print(coserve_bench.summary(vresult), file=sys.stderr)
        if args.json:
            print(json.dumps(vresult, indent=2))
        return 0

    if args.name == "controlnet":
        from stepfleet.serving.bench import controlnet_bench

        ccfg = controlnet_bench.ControlNetBenchConfig(
            model=args.model, size=128 if args.quick else args.size, steps=args.steps, max_batch=args.max_batch,
            reps=2 if args.quick else 5, replay_requests=200 if args.quick else 400,
            seeds=(0,) if args.quick else (0, 1, 2),
        )
        cresult = controlnet_bench.run(ccfg)
        print(controlnet_bench.summary(cresult), file=sys.stderr)
        if args.json:
            print(json.dumps(cresult, indent=2))
        return 0

    if args.name == "lora":
        from stepfleet.serving.bench import lora_bench

        lcfg = lora_bench.LoraBenchConfig(
            model=args.model, size=args.size or (128 if args.quick else 256), steps=args.steps, max_batch=args.max_batch,
            rank=args.rank, reps=args.reps or (2 if args.quick else 15), replay_requests=200 if args.quick else 400,
            disk_delay_ms=args.disk_delay_ms,
        )
        result = lora_bench.run(lcfg, quick=args.quick)
        print(lora_bench.summary(result), file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0

    if args.name == "stream":
        from stepfleet.serving.bench import stream_bench

        scfg = stream_bench.StreamBenchConfig(
            model=args.model, size=args.size, steps=args.steps, load=args.load, partial_images=args.partial_images,
            requests=args.requests or (6 if args.quick else 24), max_batch=args.max_batch, method=args.method,
        )
        result = stream_bench.run(scfg, quick=args.quick)
        print(stream_bench.summary(result), file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0

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
            replay_requests=1000 if args.quick else 2000, crop_decode=args.crop_decode,
            conv_halo=args.conv_halo,
        )
        result = edit_bench.run(ecfg, quick=args.quick)
        print(edit_bench.summary(result), file=sys.stderr)
        if args.json:
            print(json.dumps(result, indent=2))
        return 0

    from stepfleet.serving.bench.engine_bench import BenchConfig, run, summary

    cfg = BenchConfig(
        model=args.model, device=args.device, dtype=args.dtype, size=args.size, max_batch=args.max_batch,
        seed=args.seed, noise=args.noise, compile=args.compile, compile_backend=args.compile_backend,
        live_requests=args.live_requests or (12 if args.quick else 40),
        live_loads=(tuple(float(x) for x in args.live_loads.split(",")) if args.live_loads
                    else (1.2,) if args.quick else (0.7, 1.2, 2.0)),
        replay_requests=1000 if args.quick else 2000,
        live_rounds=args.live_rounds or (1 if args.quick else 2),
        live_baselines=not args.no_live_baselines,
        **({} if args.slo_scale is None else {"slo_scale": args.slo_scale}),
    )
    result = run(cfg, quick=args.quick)
    print(summary(result), file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
