"""`stepfleet bench coserve`: images and videos on one worker, stepfleet against GenServe's baselines.

One run: load the video model (`tiny-wan` by default), measure in this run what one denoising
step of each kind costs by batch (images: one frame; videos: `video_frames` frames, same
size), what prompt encoding and VAE decoding cost, then

- **replay** (`coserve_replay`) a seeded 85 % image / 15 % video Poisson trace at `load` × the
  mixed one-at-a-time capacity against FIFO, shortest-job-first, static partitioning,
  stepfleet without video preemption, and stepfleet — for each image SLO scale in
  `slo_image_scales` (the SLO of a kind is a multiple of its own solo latency), since how much
  preemption buys depends on how tight the image SLO is;
- **live**: the same kind of trace (fewer requests) through the real engine, with and without
  video preemption, per-kind SLOs as the engine's `slo_image_s`/`slo_video_s`.

The video decode is measured on a 9-frame clip and scaled by latent frames in quick mode (the
Wan VAE decodes latent frame by latent frame, so its cost is linear in them); the full run
decodes the whole clip.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from stepfleet.serving.bench.coserve_replay import (
    POLICIES,
    REFERENCES,
    CoserveSetup,
    KindCost,
    compare,
    mixed_capacity_rps,
    mixed_trace,
)


@dataclass(frozen=True)
class CoserveBenchConfig:
    model: str = "tiny-wan"
    device: str = "auto"
    #: 256x256 and 50 video steps: a video's denoising is 45-80x an image's (GenServe's regime, one
    #: to two orders of magnitude); at 128x128 and 30 steps it was 8x, and the VAE decode dominated.
    size: int = 256
    video_frames: int = 81
    image_steps: int = 20
    video_steps: int = 50
    guidance: float = 5.0
    max_batch: int = 4
    reps: int = 5
    load: float = 0.9
    video_share: float = 0.15
    replay_requests: int = 2000
    seeds: tuple[int, ...] = (0, 1, 2)
    slo_image_scales: tuple[float, ...] = (3.0, 4.0, 5.0)
    slo_video_scale: float = 3.0
    live_requests: int = 30
    #: Frames of the live run's videos (None: `video_frames`); a CPU decodes every frame inline.
    live_video_frames: int | None = 21
    full_video_decode: bool = True


def _params(kind: str, cfg: CoserveBenchConfig, i: int, frames: int | None = None) -> Any:
    from stepfleet.serving.params import GenerationParams

    video = kind == "video"
    return GenerationParams(prompt=f"{kind} {i}", width=cfg.size, height=cfg.size, seed=i,
                            num_frames=(frames or cfg.video_frames) if video else 1, guidance_scale=cfg.guidance,
                            num_inference_steps=cfg.video_steps if video else cfg.image_steps)


def measure(runner: Any, cfg: CoserveBenchConfig) -> dict[str, KindCost]:
    """Step seconds by denoiser rows per kind, encode and decode seconds, measured now.

    Each batch size gets its own requests and the sizes are timed round-robin, keeping each
    one's fastest step (`calibration.interleaved_min`): timed one size after the other with a
    mean of three, one run found two videos 2.7x one video's step and another 1.65x — a drift
    between two timings, read as a batching loss or gain that decided the videos' attainment.
    """
    from stepfleet.serving.calibration import interleaved_min

    out: dict[str, KindCost] = {}
    for kind, sizes in (("image", range(1, cfg.max_batch + 1)), ("video", range(1, min(2, cfg.max_batch) + 1))):
        t0 = time.perf_counter()
        batches = {b: [runner.prepare(_params(kind, cfg, 100 * b + i), i).state for i in range(b)] for b in sizes}
        encode_s = (time.perf_counter() - t0) / sum(sizes)
        table = {2 * b: s for b, s in interleaved_min({b: partial(runner.step, states) for b, states in batches.items()},
                                                      cfg.reps, warmup=1).items()}
        states = batches[1]
        if kind == "video" and not cfg.full_video_decode:
            short = runner.prepare(_params(kind, cfg, 0, frames=9), 0).state
            t0 = time.perf_counter()
            runner.decode(short)
            decode_s = (time.perf_counter() - t0) * states[0].shape[1] / short.shape[1]
        else:
            t0 = time.perf_counter()
            runner.decode(states[0])
            decode_s = time.perf_counter() - t0
        steps = cfg.video_steps if kind == "video" else cfg.image_steps
        out[kind] = KindCost(shape=states[0].shape, step_s_by_rows=table, steps=steps,
                             encode_s=encode_s, decode_s=decode_s)
    return out


def live(runner: Any, cfg: CoserveBenchConfig, costs: dict[str, KindCost], slo_image_s: float,
         slo_video_s: float, video_preemption: bool) -> dict[str, Any]:
    """The trace through the real engine; SLO attainment per kind from the engine's own deadlines."""
    from stepfleet.serving.contracts import RequestKind
    from stepfleet.serving.coschedule import CoScheduleConfig
    from stepfleet.serving.engine import Engine, EngineConfig

    frames = cfg.live_video_frames or cfg.video_frames
    video = dataclasses.replace(costs["video"], step_s_by_rows={
        r: s * frames / cfg.video_frames for r, s in costs["video"].step_s_by_rows.items()})
    # On a CPU, encoding and decoding run on the step loop's thread: capacity counts them too.
    inline = runner.device_type == "cpu"
    video = dataclasses.replace(video, decode_s=costs["video"].decode_s * frames / cfg.video_frames)
    image = costs["image"]
    if inline:
        image, video = (dataclasses.replace(k, step_s_by_rows={
            r: s + (k.encode_s + k.decode_s) / k.steps for r, s in k.step_s_by_rows.items()}) for k in (image, video))
    rate = cfg.load * mixed_capacity_rps(image, video, cfg.video_share)
    trace = mixed_trace(rate, cfg.live_requests, cfg.video_share, seed=cfg.seeds[0])
    if trace and not any(a.kind == "video" for a in trace):  # a short trace may draw none: make its middle one
        mid = len(trace) // 2
        trace[mid] = dataclasses.replace(trace[mid], kind="video")
    engine = Engine(runner, EngineConfig(max_batch=cfg.max_batch, max_queue=10_000, slo_image_s=slo_image_s,
                                         slo_video_s=slo_video_s,
                                         coschedule=CoScheduleConfig(video_preemption=video_preemption))).start()
    reqs: list[tuple[str, Any]] = []
    try:
        start = time.monotonic()
        for i, a in enumerate(trace):
            delay = a.arrival_s - (time.monotonic() - start)
            if delay > 0:
                time.sleep(delay)
            kind = RequestKind.VIDEO if a.kind == "video" else RequestKind.GENERATION
            reqs.append((a.kind, engine.submit(_params(a.kind, cfg, i, frames=frames), kind=kind)))
        for _, r in reqs:
            r.future.result(timeout=3600)
    finally:
        engine.stop()
    out: dict[str, Any] = {"requests": len(reqs), "video_frames": frames, "rate_rps": rate}
    for kind in ("image", "video"):
        mine = [r for k, r in reqs if k == kind]
        out[f"{kind}_attainment"] = (sum(1 for r in mine if r.deadline_met) / len(mine)) if mine else None
    out["attainment"] = sum(1 for _, r in reqs if r.deadline_met) / len(reqs)
    return out


def run(cfg: CoserveBenchConfig, quick: bool = False) -> dict[str, Any]:
    from stepfleet.serving.backbones import load_backbone
    from stepfleet.serving.loading import load_model
    from stepfleet.serving.runner import ModelRunner

    runner = ModelRunner(load_backbone(load_model(cfg.model, device=cfg.device)))
    costs = measure(runner, cfg)
    image, video = costs["image"], costs["video"]
    replays = []
    for scale in cfg.slo_image_scales:
        setup = CoserveSetup(image, video, scale * image.solo_s(), cfg.slo_video_scale * video.solo_s(),
                             max_batch=cfg.max_batch)
        replays.append({"slo_image_scale": scale, "slo_video_scale": cfg.slo_video_scale,
                        "slo_image_s": setup.slo_image_s, "slo_video_s": setup.slo_video_s,
                        **compare(setup, cfg.load, cfg.replay_requests, cfg.seeds, cfg.video_share)})
    lives = {}
    if cfg.live_requests:
        scale = cfg.slo_image_scales[0]
        frames = cfg.live_video_frames or cfg.video_frames
        vid_solo = video.encode_s + video.device_s() * frames / cfg.video_frames + video.decode_s * frames / cfg.video_frames
        for name, vp in (("stepfleet", True), ("no-video-preemption", False)):
            lives[name] = live(runner, cfg, costs, scale * image.solo_s(), cfg.slo_video_scale * vid_solo, vp)
    return {
        "config": dataclasses.asdict(cfg), "quick": quick,
        "costs": {k: dataclasses.asdict(v) for k, v in costs.items()},
        "solo_s": {"image": image.solo_s(), "video": video.solo_s()},
        "replay": replays, "live": lives,
    }


def summary(result: dict[str, Any]) -> str:
    lines = ["coserve: images and videos on one worker",
             f"solo latency: image {result['solo_s']['image']:.2f}s, video {result['solo_s']['video']:.2f}s"]
    for r in result["replay"]:
        lines.append(f"replay, load {r['load']}, SLO image {r['slo_image_scale']:g}x solo, video "
                     f"{r['slo_video_scale']:g}x: attainment overall/image/video")
        for p in POLICIES + REFERENCES:
            d = r["policies"][p]
            lines.append(f"  {p:>20}: {d['attainment']:.3f} / {d['image_attainment']:.3f} / {d['video_attainment']:.3f}"
                         f"  (max video pause {d['max_video_pause_s']:.1f}s)")
        lines.append(f"  criteria: {r['criteria']}")
    for name, d in result["live"].items():
        lines.append(f"live {name}: overall {d['attainment']:.3f}, image {d['image_attainment']}, "
                     f"video {d['video_attainment']} ({d['requests']} requests)")
    return "\n".join(lines)

