"""Images and videos on one worker: a discrete-event replay of GenServe's comparison (pure).

A seeded Poisson trace mixes images and videos (85 % / 15 % by default); each kind has its
own SLO, a multiple of its solo latency. Every policy runs on the same step-level machinery
— the engine's own `StepPlanner`, shape groups, continuous batching, measured step costs —
and differs only in what GenServe's baselines differ in:

- `fifo`: arrival order, no preemption (a running group drains before another shape runs);
- `sjf`: shortest job (solo step time) first, no preemption;
- `static`: the worker partitioned between the kinds at a fixed split, each kind's share of
  the offered work (the split an operator sizes from the workload): each kind runs on its
  share at that fraction of the speed, side by side (as MPS/MIG or a fixed time-division
  would), EDF inside a kind, batching kept;
- `static-oracle` (a reference, not a baseline): the same at the best of `STATIC_IMAGE_SHARES`
  and the proportional split, chosen after the fact for this trace and these SLOs — the most
  any fixed split could attain, which no operator can pick in advance;
- `no-video-preemption`: stepfleet's EDF on the per-kind deadlines, videos never paused;
- `stepfleet`: the same, and running videos pause for an image that would miss its deadline
  (`serving.coschedule`), with bounded pause time and paused count.

Time model. Denoising steps are serialised on the device at the measured cost of their batch.
Prompt encoding and VAE decoding run beside the step loop (the engine's auxiliary thread on
an accelerator): a request becomes ready `encode_s` after it arrives and finishes `decode_s`
after its last step. On a CPU the live engine runs them between steps instead; the replay is
the scheduling figure, the live run (`coserve_bench`) the measured one.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from stepfleet.serving.bench.trace import percentile
from stepfleet.serving.contracts import StepResult
from stepfleet.serving.coschedule import CoScheduleConfig
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.planner import Phase, PlannerConfig, Seq, StepPlanner, apply_plan, update

POLICIES: tuple[str, ...] = ("fifo", "sjf", "static", "no-video-preemption", "stepfleet")
#: Replayed beside the policies but not a baseline: an upper bound for static partitioning.
REFERENCES: tuple[str, ...] = ("static-oracle",)
KINDS: tuple[str, ...] = ("image", "video")
GUIDED_ROWS = 2  # classifier-free guidance: two denoiser rows per request


@dataclass(frozen=True)
class KindCost:
    """One kind's measured costs: its latent shape, step seconds by denoiser rows, steps per request."""

    shape: tuple[int, ...]
    step_s_by_rows: dict[int, float]
    steps: int
    encode_s: float
    decode_s: float

    def step_s(self) -> float:
        return self.step_s_by_rows[min(self.step_s_by_rows, key=lambda r: abs(r - GUIDED_ROWS))]

    def device_s(self) -> float:
        """Solo step time of one request."""
        return self.steps * self.step_s()

    def solo_s(self) -> float:
        """Solo latency of one request: encode, steps, decode."""
        return self.encode_s + self.device_s() + self.decode_s


@dataclass(frozen=True)
class Arrival:
    id: str
    kind: str
    arrival_s: float


@dataclass(frozen=True)
class CoserveSetup:
    image: KindCost
    video: KindCost
    slo_image_s: float
    slo_video_s: float
    max_batch: int = 4
    coschedule: CoScheduleConfig = CoScheduleConfig()

    def cost(self, kind: str) -> KindCost:
        return self.image if kind == "image" else self.video

    def slo(self, kind: str) -> float:
        return self.slo_image_s if kind == "image" else self.slo_video_s


def mixed_capacity_rps(image: KindCost, video: KindCost, video_share: float) -> float:
    """Requests per second one worker serves one at a time at this mix (device time only)."""
    return 1.0 / ((1 - video_share) * image.device_s() + video_share * video.device_s())


def mixed_trace(rate_rps: float, count: int, video_share: float, seed: int) -> list[Arrival]:
    """`count` Poisson arrivals; each a video with probability `video_share`."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        if i:
            t += rng.expovariate(rate_rps)
        out.append(Arrival(f"r{i:05d}", "video" if rng.random() < video_share else "image", t))
    return out


def _planner(policy: str, setup: CoserveSetup) -> StepPlanner:
    cost = StepCostModel()
    for kind in KINDS:
        cost.calibrate(setup.cost(kind).shape, setup.cost(kind).step_s_by_rows)
    video_preemption = policy == "stepfleet"
    config = PlannerConfig(
        max_batch=setup.max_batch, preemption=policy not in ("fifo", "sjf"),
        coschedule=dataclasses.replace(setup.coschedule, video_preemption=video_preemption),
    )
    return StepPlanner(config, cost)


def _seq(a: Arrival, setup: CoserveSetup, policy: str) -> Seq:
    kc = setup.cost(a.kind)
    due = a.arrival_s + setup.slo(a.kind)
    # The baselines order by what they order by; stepfleet by the real per-kind deadline.
    rank = {"fifo": a.arrival_s, "sjf": kc.device_s()}.get(policy, due)
    return Seq(id=a.id, shape=kc.shape, rows=1, unet_rows=GUIDED_ROWS, steps_total=kc.steps, arrival=a.arrival_s,
               deadline=rank, explicit_deadline=policy not in ("fifo", "sjf"), kind=a.kind)


#: Image shares of the device the static partition tries (the proportional split is added).
STATIC_IMAGE_SHARES: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))


def replay(trace: Sequence[Arrival], setup: CoserveSetup, policy: str) -> dict[str, object]:
    """Run `policy` over `trace`; SLO attainment overall and per kind, latencies, video pauses."""
    if policy == "static":
        return static_partition(trace, setup, image_shares=())
    if policy == "static-oracle":
        return static_partition(trace, setup)
    finish, every, pauses = _run(trace, setup, policy)
    return _figures(trace, setup, finish, every, pauses)


def static_partition(trace: Sequence[Arrival], setup: CoserveSetup,
                     image_shares: Sequence[float] = STATIC_IMAGE_SHARES) -> dict[str, object]:
    """Static partitioning at its best fixed split for this trace: the highest overall attainment
    over `image_shares` and the proportional split (each kind's share of the offered work).

    Why search: the proportional split is right for throughput but not for deadlines — where
    videos carry most of the work it leaves images a sliver of the device and every image
    late, while a split that favours images may still finish the videos in time.
    """
    offered = {k: sum(setup.cost(a.kind).device_s() for a in trace if a.kind == k) for k in KINDS}
    proportional = offered["image"] / (sum(offered.values()) or 1.0)
    best: dict[str, object] | None = None
    for share in sorted({*image_shares, proportional}):
        result = _static_at(trace, setup, share)
        if best is None or result["attainment"] > best["attainment"]:  # type: ignore[operator]
            best = result
    assert best is not None
    best["static_proportional_image_share"] = proportional
    return best


def _static_at(trace: Sequence[Arrival], setup: CoserveSetup, image_share: float) -> dict[str, object]:
    """Each kind on its own share of the device, side by side, at that fraction of the speed."""
    finish: dict[str, float] = {}
    every: dict[str, Seq] = {}
    for kind, share in (("image", image_share), ("video", 1.0 - image_share)):
        share = max(1e-9, share)
        kc = setup.cost(kind)
        slowed = dataclasses.replace(kc, step_s_by_rows={r: s / share for r, s in kc.step_s_by_rows.items()})
        part = dataclasses.replace(setup, **{kind: slowed})
        f, e, _ = _run([a for a in trace if a.kind == kind], part, "static")
        finish.update(f)
        every.update(e)
    out = _figures(trace, setup, finish, every, 0)
    out["static_image_share"] = image_share
    return out


def _run(trace: Sequence[Arrival], setup: CoserveSetup, policy: str) -> tuple[dict[str, float], dict[str, Seq], int]:
    """The step loop on simulated time: (finish times, every request's seq, videos paused)."""
    planner = _planner(policy, setup)
    truth = StepCostModel()
    for kind in KINDS:
        truth.calibrate(setup.cost(kind).shape, setup.cost(kind).step_s_by_rows)
    ready = sorted(((a.arrival_s + setup.cost(a.kind).encode_s, a) for a in trace), key=lambda x: (x[0], x[1].id))
    seqs: dict[str, Seq] = {}
    every: dict[str, Seq] = {}
    finish: dict[str, float] = {}
    now, i, video_pauses = 0.0, 0, 0
    while i < len(ready) or seqs:
        while i < len(ready) and ready[i][0] <= now:
            seq = _seq(ready[i][1], setup, policy)
            seqs[seq.id] = every[seq.id] = seq
            i += 1
        plan = planner.plan(seqs.values(), now)
        if plan.idle:
            if i >= len(ready):
                break  # cannot happen with valid plans: nothing runnable and nothing coming
            now = max(now, ready[i][0])
            continue
        video_pauses += sum(1 for sid in plan.paused if seqs[sid].kind == "video"
                            and seqs[sid].phase is Phase.RUNNING)
        apply_plan(seqs, plan, now)
        seconds = truth.step_seconds(seqs[plan.batch[0]].shape, GUIDED_ROWS * len(plan.batch))
        now += seconds
        for sid in update(seqs, plan, StepResult(stepped=plan.batch, seconds=seconds)).finished:
            finish[sid] = now + setup.cost(every[sid].kind).decode_s
    return finish, every, video_pauses


def _figures(trace: Sequence[Arrival], setup: CoserveSetup, finish: dict[str, float], every: dict[str, Seq],
             video_pauses: int) -> dict[str, object]:
    out: dict[str, object] = {}
    met_all = 0
    for kind in KINDS:
        reqs = [a for a in trace if a.kind == kind]
        lat = [finish[a.id] - a.arrival_s for a in reqs if a.id in finish]
        met = sum(1 for x in lat if x <= setup.slo(kind))
        met_all += met
        out[kind] = {"requests": len(reqs), "completed": len(lat),
                     "attainment": met / len(reqs) if reqs else math.nan,
                     "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95)}
    pauses = [every[a.id].paused_s for a in trace if a.kind == "video" and a.id in every]
    out["attainment"] = met_all / len(trace) if trace else math.nan
    out["video_pauses"] = video_pauses
    out["max_video_pause_s"] = max(pauses, default=0.0)
    out["videos_unfinished"] = sum(1 for a in trace if a.kind == "video" and a.id not in finish)
    return out


def compare(setup: CoserveSetup, load: float, count: int, seeds: Sequence[int],
            video_share: float = 0.15) -> dict[str, object]:
    """Every policy on the same seeded traces at `load` × the mixed one-at-a-time capacity."""
    rate = load * mixed_capacity_rps(setup.image, setup.video, video_share)
    runs = {p: [replay(mixed_trace(rate, count, video_share, seed), setup, p) for seed in seeds]
            for p in POLICIES + REFERENCES}

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    table: dict[str, dict[str, float]] = {}
    for p, rs in runs.items():
        table[p] = {
            "attainment": mean([r["attainment"] for r in rs]),  # type: ignore[misc]
            "image_attainment": mean([r["image"]["attainment"] for r in rs]),  # type: ignore[index]
            "video_attainment": mean([r["video"]["attainment"] for r in rs]),  # type: ignore[index]
            "image_p95_s": mean([r["image"]["p95_s"] for r in rs]),  # type: ignore[index]
            "video_p95_s": mean([r["video"]["p95_s"] for r in rs]),  # type: ignore[index]
            "video_pauses": mean([r["video_pauses"] for r in rs]),  # type: ignore[misc]
            "max_video_pause_s": max(r["max_video_pause_s"] for r in rs),  # type: ignore[type-var]
            "videos_unfinished": sum(r["videos_unfinished"] for r in rs),  # type: ignore[misc]
        }
        if p.startswith("static"):  # the split used (the oracle's choice), and the proportional one
            table[p]["image_share"] = mean([r["static_image_share"] for r in rs])  # type: ignore[misc]
            table[p]["proportional_image_share"] = mean(
                [r["static_proportional_image_share"] for r in rs])  # type: ignore[misc]
    best = max((p for p in POLICIES if p != "stepfleet"), key=lambda p: table[p]["attainment"])
    ours = table["stepfleet"]
    bound = setup.coschedule.max_pause_s
    return {
        "load": load, "rate_rps": rate, "requests": count, "seeds": list(seeds), "video_share": video_share,
        "policies": table, "best_baseline": best,
        "criteria": {
            "margin_over_best_baseline": ours["attainment"] - table[best]["attainment"],
            "margin_ok": ours["attainment"] >= table[best]["attainment"] + 0.15,
            # Against the best fixed split chosen after the fact: bounded by 1 - its attainment.
            "margin_over_static_oracle": ours["attainment"] - table["static-oracle"]["attainment"],
            "image_attainment_ok": ours["image_attainment"] >= 0.95,
            "no_video_starves": ours["videos_unfinished"] == 0 and ours["max_video_pause_s"] <= bound
            + 2 * setup.video.step_s(),
        },
    }
