"""Plans each denoising step: who joins, who continues, who is paused, who runs at all.

This is the scheduling brain of the step-level engine, kept pure (no torch, no clock, no
threads) so the live engine, the benchmark's discrete-event replay and the unit tests all
run the very same decisions. One call, one step: `plan` returns a `StepPlan`, the
engine applies it and runs one model call for `plan.batch`, and `update(plan, result)`
advances and retires work — the same three calls in the live engine and in the replay.

Ordering. Candidates (waiting and paused requests) are ranked by priority class, then by
earliest deadline, then by arrival. A request without an explicit deadline gets one derived
from its own solo service time (see `Engine`), so among equals shorter jobs come first but
an old long job still overtakes a fresh short one eventually. Once a derived deadline has
passed the request is overdue: overdue requests go first, in arrival order (`Seq.urgency`),
so under a sustained overload a long request is not overtaken by every short one after it.

Shapes. One model call needs one latent shape, so a step runs requests of a single shape.
The running group keeps its shape while it has members; a candidate of the running shape
is admitted only if no candidate of another shape outranks it, so an older request of
another shape is never starved: the group drains and that shape goes next.

Batch sizing. How many rows a step takes is a trade of latency for throughput that depends on
the queue, so it is one pure rule (`size_batch`) whose verdict and reason travel in the plan:
with nothing queueing, the batch stops growing where the measured step-cost curve gains less
than `min_batch_gain` per row (small batches finish each request sooner); once a waiting request
has queued longer than `backlog_wait_fraction` of its own service time, every throughput gain
the curve offers is taken (more than `backlog_min_gain` per row), up to `max_batch` — under
overload waiting dominates latency, and a rule that held batches small there lost to
request-level batching (issue 21); and when requests with explicit deadlines would miss them,
the batch is the one that finishes them soonest (fewest misses, then earliest completion),
found by simulating the candidates.

Preemption. When the batch is full, the most urgent candidate may pause the running
request with the most slack: always if its priority class is higher; within a class only
if it has an explicit deadline it would miss by waiting for a slot to free, and the victim
can afford the delay. Paused requests keep their latents and scheduler state and resume
later exactly where they stopped.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from stepfleet.serving.compiled.buckets import RowBuckets, fill_bucket
from stepfleet.serving.contracts import StepResult
from stepfleet.serving.coschedule import IMAGE, CoScheduleConfig, overdue, video_yield
from stepfleet.serving.costmodel import StepCostModel

#: A request without an explicit deadline is due after this many times its solo service time
#: (the engine's `slo_scale`). 2x, not 4x: with soft deadlines at 4x a short request kept
#: overtaking a long one for 4 solo times before the long one became overdue, and under a noisy
#: neighbour (where batching stops paying) that order alone cost the p95 at load 1.2 against a
#: request-level batcher; replayed at ten seeds, 2x held every seed for 0.02-0.03 of mean
#: latency (docs/benchmarks.md, issue 21, sessions 11-12).
DEFAULT_SLO_SCALE = 2.0


class Phase(enum.Enum):
    WAITING = "waiting"  # ready (prompt encoded) but never stepped
    RUNNING = "running"  # in the batch of the last step
    PAUSED = "paused"  # started, then preempted or set aside; state kept


@dataclass
class Seq:
    """The planner's view of one request: no tensors, only what ordering needs."""

    id: str
    shape: Hashable
    rows: int  # images: the slots it takes in the batch
    steps_total: int
    arrival: float
    deadline: float = math.inf
    explicit_deadline: bool = False
    priority: int = 1
    unet_rows: int = 0  # rows it adds to a model call (2x images with classifier-free guidance)
    steps_done: int = 0
    phase: Phase = Phase.WAITING
    #: What its steps' cost is learned under (`costmodel.cost_key`); the shape by default.
    cost_key: Hashable = None
    #: `image` or `video` (`serving.coschedule`: videos yield to images at step boundaries).
    kind: str = "image"
    #: When its current pause began (planner clock; None while not paused) and its closed pauses' total.
    paused_at: float | None = None
    paused_s: float = 0.0
    #: A video paused for its whole bound: it resumes before any other work of its priority.
    resume_first: bool = False

    def __post_init__(self) -> None:
        if not self.unet_rows:
            self.unet_rows = self.rows
        if self.cost_key is None:
            self.cost_key = self.shape

    @property
    def steps_left(self) -> int:
        return self.steps_total - self.steps_done

    def urgency(self, now: float | None = None) -> tuple[int, bool, bool, float, float, str]:
        """Sort key: smaller is more urgent.

        Given `now`, a request whose *derived* deadline (no explicit one) has passed is overdue:
        it ranks ahead of those still in time, and overdue requests rank among themselves by
        arrival. Why: a derived deadline is only an ordering device (shortest first, with
        ageing), and once it has passed, ordering by it keeps favouring requests that are short
        and young — under a sustained overload a long request is overtaken by every short one
        that arrives within a few of its service times, and the tail grows with the overload.
        In arrival order an overdue request waits only for those that went overdue before it.
        Explicit deadlines keep their earliest-first order (a missed one is already first).
        """
        if now is not None and not self.explicit_deadline and self.deadline < now:
            return (-self.priority, not self.resume_first, False, self.arrival, self.arrival, self.id)
        return (-self.priority, not self.resume_first, True, self.deadline, self.arrival, self.id)


@dataclass(frozen=True)
class PlannerConfig:
    """How the step loop admits work.

    `policy="static"` is the request-level batching baseline (fill the batch or wait
    `static_wait_s`, then run that batch until every member is done); it exists so the
    benchmark compares policies on identical machinery.
    """

    max_batch: int = 8
    policy: Literal["continuous", "static"] = "continuous"
    preemption: bool = True
    static_wait_s: float = 0.5
    #: Cost-aware batch sizing: stop growing the batch once one more row lowers the
    #: measured per-row step cost by less than this fraction. On a GPU the curve is flat
    #: and batches fill; on a CPU, where cost is nearly linear in rows, small batches
    #: finish each request sooner at almost the same throughput. 0 disables the cap.
    #: Applies while nothing queues (see `backlog_wait_fraction`).
    min_batch_gain: float = 0.05
    #: A waiting request that has queued longer than this fraction of its own solo service time
    #: means work is backing up: then batches take every throughput gain up to `max_batch`
    #: (`backlog_min_gain`). Half a service time: a request held back by the latency-first
    #: cap gets in before it has waited as long as it will run.
    backlog_wait_fraction: float = 0.5
    #: Under a backlog, the per-row gain a bigger batch must offer over a smaller one. Not 0:
    #: on a CPU the fourth image of a batch buys ~1.6 % throughput for 31 % longer steps for
    #: every member, which lengthened the tail under bursts without serving more (issue 21's
    #: replays: p95 vs the peer-shaped baseline 0.84 -> 0.80 at load 0.7, saturated throughput
    #: 0.99 of the batching limit). 2 % is about the learned curve's own noise.
    backlog_min_gain: float = 0.02
    #: Rank requests whose derived deadline has passed first, by arrival (`Seq.urgency`).
    overdue_by_arrival: bool = True
    #: Size batches for explicit deadlines that would be missed otherwise (simulated per step).
    deadline_sizing: bool = True
    #: How videos yield to images (`serving.coschedule`).
    coschedule: CoScheduleConfig = field(default_factory=CoScheduleConfig)
    #: A compiled worker's denoiser row buckets (`serving.compiled.buckets`): a step's rows never
    #: exceed the largest, are padded to the next, and a batch that would spill into a nearly
    #: empty larger bucket is trimmed to fill the smaller one when that is cheaper per row.
    row_buckets: RowBuckets | None = None


class SizingMode(enum.Enum):
    """Which rule sized a step's batch (in the plan, `/v1/load` and `/metrics`)."""

    LIGHT = "light"  # nothing queues: stop where the per-row gain gets small
    BACKLOG = "backlog"  # requests queue: every throughput gain, up to max_batch
    DEADLINE = "deadline"  # explicit deadlines at risk: the batch that finishes them soonest


@dataclass(frozen=True)
class BatchSizing:
    """The batch-size verdict of one plan, with its reason.

    `cap_rows` is in UNet rows (classifier-free guidance doubles an image's rows); None means
    no cost-based cap (`max_batch` images bound the batch). Under LIGHT and BACKLOG it is the
    cap of the head request's cost variant (each variant is capped by its own curve under the
    same rule); under DEADLINE it bounds the whole batch, as simulated. `cap_images` is the same
    cap in images of the head request, at most `max_batch`.
    """

    mode: SizingMode
    cap_rows: int | None
    cap_images: int
    why: str


@dataclass(frozen=True)
class StepPlan:
    """One step's decisions, as data (read it in logs; assert on it in tests)."""

    batch: tuple[str, ...] = ()
    admitted: tuple[str, ...] = ()
    resumed: tuple[str, ...] = ()
    paused: tuple[str, ...] = ()
    shape: Hashable | None = None
    #: When nothing can run yet (static batching waiting to fill), when to look again.
    wake_at: float | None = None
    reasons: tuple[str, ...] = field(default=())
    #: How the batch was sized (continuous policy; None when idle or static).
    sizing: BatchSizing | None = None

    @property
    def idle(self) -> bool:
        return not self.batch


def slack(seq: Seq, now: float, step_s: float) -> float:
    """Seconds to spare before `seq` misses its deadline at the given step duration."""
    return seq.deadline - now - seq.steps_left * step_s


class StepPlanner:
    """Stateless planner; all state lives in the `Seq` objects the engine owns."""

    def __init__(self, config: PlannerConfig, cost: StepCostModel | None = None) -> None:
        self.config = config
        self.cost = cost or StepCostModel()

    def plan(self, seqs: Iterable[Seq], now: float) -> StepPlan:
        live = list(seqs)
        if self.config.policy == "static":
            return self._plan_static(live, now)
        return self._plan_continuous(live, now)

    # -- continuous ------------------------------------------------------------------
    def _plan_continuous(self, live: list[Seq], now: float) -> StepPlan:
        for s in live:
            s.resume_first = s.phase is Phase.PAUSED and overdue(s, now, self.config.coschedule)
        running = [s for s in live if s.phase is Phase.RUNNING]
        at = now if self.config.overdue_by_arrival else None
        cands = sorted((s for s in live if s.phase is not Phase.RUNNING), key=lambda s: s.urgency(at))
        if not running and not cands:
            return StepPlan()
        reasons: list[str] = []
        paused: list[Seq] = []
        shape = running[0].shape if running else cands[0].shape
        yielded = False

        if running and self.config.preemption:
            other = next((c for c in cands if c.shape != shape), None)
            if other is not None and other.priority > max(r.priority for r in running):
                reasons.append(f"switch shape for higher-priority {other.id}")
                paused.extend(running)
                running = []
                shape = other.shape
            elif (why := video_yield(running, cands, now, self.cost, self.config.coschedule,
                                            self.config.max_batch)) is not None:
                reasons.append(why)
                paused.extend(running)
                running = []
                shape = next(c.shape for c in cands if c.kind == IMAGE)  # the image's group
                yielded = True

        batch = list(running)
        rows = sum(s.rows for s in batch)
        # After videos yielded, the images at risk run even where a video ranks before them (it can wait).
        fence = None if yielded else next((c for c in cands if c.shape != shape), None)
        queue = [
            c
            for c in cands
            if c.shape == shape and c not in paused and (fence is None or c.urgency(at) < fence.urgency(at))
        ]
        admitted: list[Seq] = []
        sizing = size_batch(batch, queue, now, self.config, self.cost)
        # Per cost variant: each kind of step grows only as far as its own curve says it pays,
        # under the rule the queue's state chose; a deadline verdict bounds the whole batch.
        caps: dict[Hashable, int | None] = {}
        rows_of: dict[Hashable, int] = {}
        for s in batch:
            rows_of[s.cost_key] = rows_of.get(s.cost_key, 0) + s.unet_rows
        unet_total = sum(rows_of.values())
        # A request with more images than a batch holds runs alone (the worker refuses such
        # requests, but a planner that waited for room would hold its whole shape back forever).
        top = self.config.row_buckets.largest if self.config.row_buckets is not None else None
        while queue and (rows + queue[0].rows <= self.config.max_batch or not batch):
            if top is not None and batch and unet_total + queue[0].unet_rows > top:
                reasons.append(f"batch held at {unet_total} rows: the largest compiled bucket is {top}")
                break
            key = queue[0].cost_key
            if sizing.mode is SizingMode.DEADLINE:
                if batch and sizing.cap_rows is not None and unet_total + queue[0].unet_rows > sizing.cap_rows:
                    reasons.append(f"batch held at {unet_total} rows: {sizing.why}")
                    break
            else:
                if key not in caps:
                    caps[key] = _variant_cap(self.cost, key, sizing.mode, self.config)
                have = rows_of.get(key, 0)
                if have and caps[key] is not None and have + queue[0].unet_rows > caps[key]:
                    reasons.append(f"batch held at {have} rows: measured gain beyond {caps[key]} rows is too small "
                                   f"({sizing.mode.value})")
                    break
            c = queue.pop(0)
            batch.append(c)
            admitted.append(c)
            rows += c.rows
            rows_of[key] = rows_of.get(key, 0) + c.unet_rows
            unet_total += c.unet_rows

        if queue and self.config.preemption:
            batch, rows = self._preempt(batch, running, queue, paused, admitted, rows, now, reasons)
        if self.config.row_buckets is not None and batch:
            batch = self._fill_bucket(batch, admitted, paused, sizing, reasons)

        if not batch:
            return StepPlan(paused=tuple(s.id for s in paused), reasons=tuple(reasons))
        return StepPlan(
            batch=tuple(s.id for s in batch),
            admitted=tuple(s.id for s in admitted if s.phase is Phase.WAITING),
            resumed=tuple(s.id for s in admitted if s.phase is Phase.PAUSED),
            paused=tuple(s.id for s in paused),
            shape=shape,
            reasons=(sizing.why, *reasons),
            sizing=sizing,
        )

    def _fill_bucket(self, batch: list[Seq], admitted: list[Seq], paused: list[Seq], sizing: BatchSizing,
                     reasons: list[str]) -> list[Seq]:
        """Trim this step's least urgent admissions when filling a smaller bucket beats padding.

        Only plain admissions are trimmed (not when this step preempted: the swap was for
        urgency), and not under deadline sizing (its batch was simulated whole).
        """
        buckets = self.config.row_buckets
        assert buckets is not None
        fresh = [s for s in batch if s in admitted]
        ordered = [s for s in batch if s not in admitted] + fresh
        rows = [s.unet_rows for s in ordered]
        if buckets.pad(sum(rows)) is None:  # one request alone larger than every bucket: it runs eager
            return batch
        # Members from this index on may wait for the next step: none after a preemption or under
        # deadline sizing, else this step's plain admissions.
        first_droppable = len(ordered) if paused or sizing.mode is SizingMode.DEADLINE else len(ordered) - len(fresh)
        key = ordered[0].cost_key
        verdict = fill_bucket(rows, first_droppable, buckets, lambda r: self.cost.step_seconds(key, r),
                              throughput_first=sizing.mode is SizingMode.BACKLOG)
        if verdict.why is not None:
            reasons.append(verdict.why)
        for s in ordered[verdict.keep:]:
            admitted.remove(s)
        return ordered[: verdict.keep]

    def _preempt(
        self,
        batch: list[Seq],
        running: Sequence[Seq],
        queue: list[Seq],
        paused: list[Seq],
        admitted: list[Seq],
        rows: int,
        now: float,
        reasons: list[str],
    ) -> tuple[list[Seq], int]:
        """Swap urgent candidates in for the running requests that can best afford to wait."""
        for cand in queue:
            victims = [s for s in batch if s in running]
            if not victims:
                break
            step_s = self.cost.step_seconds(cand.shape, sum(s.unet_rows for s in batch))
            victim = max(victims, key=lambda s: (-s.priority, slack(s, now, step_s)))
            if rows - victim.rows + cand.rows > self.config.max_batch:
                break
            why = self._why_preempt(cand, victim, batch, now, step_s)
            if why is None:
                break
            batch.remove(victim)
            paused.append(victim)
            batch.append(cand)
            admitted.append(cand)
            rows += cand.rows - victim.rows
            reasons.append(f"{cand.id} preempts {victim.id}: {why}")
        return batch, rows

    @staticmethod
    def _why_preempt(cand: Seq, victim: Seq, batch: Sequence[Seq], now: float, step_s: float) -> str | None:
        if cand.priority > victim.priority:
            return f"priority {cand.priority} > {victim.priority}"
        if cand.priority < victim.priority or not cand.explicit_deadline:
            return None
        wait_for_slot = min(s.steps_left for s in batch) * step_s
        own_service = cand.steps_left * step_s
        would_miss = now + wait_for_slot + own_service > cand.deadline
        victim_can_wait = slack(victim, now, step_s) > own_service
        if would_miss and victim_can_wait:
            return "deadline at risk and the victim has slack"
        return None

    # -- static (baseline) -----------------------------------------------------------
    def _plan_static(self, live: list[Seq], now: float) -> StepPlan:
        running = [s for s in live if s.phase is Phase.RUNNING]
        if running:
            return StepPlan(batch=tuple(s.id for s in running), shape=running[0].shape)
        cands = sorted((s for s in live if s.phase is Phase.WAITING), key=lambda s: (s.arrival, s.id))
        if not cands:
            return StepPlan()
        shape = cands[0].shape
        group: list[Seq] = []
        rows = 0
        for c in cands:
            if c.shape == shape and (rows + c.rows <= self.config.max_batch or not group):
                group.append(c)
                rows += c.rows
        full = rows >= self.config.max_batch or len(group) < sum(1 for c in cands if c.shape == shape)
        oldest_wait_end = cands[0].arrival + self.config.static_wait_s
        if not full and now < oldest_wait_end:
            return StepPlan(wake_at=oldest_wait_end)
        return StepPlan(
            batch=tuple(s.id for s in group), admitted=tuple(s.id for s in group), shape=shape
        )


# -- batch sizing (pure) ---------------------------------------------------------------


def _variant_cap(cost: StepCostModel, key: Hashable, mode: SizingMode, config: PlannerConfig) -> int | None:
    """A cost variant's row cap under `mode` (LIGHT or BACKLOG): None when the curve says fill."""
    if mode is SizingMode.LIGHT:
        return cost.efficient_rows(key, config.min_batch_gain) if config.min_batch_gain else None
    return cost.best_throughput_rows(key, config.backlog_min_gain)


def _cap_images(cap_rows: int | None, head: Seq, max_batch: int) -> int:
    if cap_rows is None:
        return max_batch
    per_image = max(1, head.unet_rows // max(1, head.rows))
    return max(1, min(max_batch, cap_rows // per_image))


def size_batch(running: Sequence[Seq], queue: Sequence[Seq], now: float, config: PlannerConfig,
               cost: StepCostModel) -> BatchSizing:
    """The batch-size rule of one step: light, backlog or deadline (see the module docstring).

    `running` are the requests already in the batch, `queue` the candidates of the same shape
    in admission order. Pure: the same state gives the same verdict in the engine and the replay.
    """
    head = queue[0] if queue else running[0] if running else None
    if head is None:
        return BatchSizing(SizingMode.LIGHT, None, config.max_batch, "nothing to run")
    key = head.cost_key
    mode = SizingMode.LIGHT
    why = "no backlog"
    # The most urgent waiting request that has queued longer than the fraction of its own
    # service time. One step's cost per (variant, rows) is looked up once, and the scan stops at
    # the first such request: a saturated queue holds hundreds, and is found at its head.
    step_of: dict[tuple[Hashable, int], float] = {}
    for s in queue:
        if s.phase is not Phase.WAITING:
            continue
        if (s.cost_key, s.unet_rows) not in step_of:
            step_of[(s.cost_key, s.unet_rows)] = cost.step_seconds(s.cost_key, s.unet_rows)
        wait, service = now - s.arrival, s.steps_left * step_of[(s.cost_key, s.unet_rows)]
        if wait > config.backlog_wait_fraction * service:
            mode = SizingMode.BACKLOG
            why = f"backlog: {s.id} waited {wait:.2f}s > {config.backlog_wait_fraction:g} x {service:.2f}s service"
            break
    cap = _variant_cap(cost, key, mode, config)
    base = BatchSizing(mode, cap, _cap_images(cap, head, config.max_batch),
                       f"{why}; {'no cap' if cap is None else f'cap {cap} rows'}")
    if not queue or not config.deadline_sizing:
        return base
    return _size_for_deadlines(running, queue, now, config, cost, key, base) or base


def _size_for_deadlines(running: Sequence[Seq], queue: Sequence[Seq], now: float, config: PlannerConfig,
                        cost: StepCostModel, key: Hashable, base: BatchSizing) -> BatchSizing | None:
    """The batch that finishes explicit deadlines soonest, if it saves one the base cap would miss.

    Simulates the candidates under each reachable total-rows cap (the running batch plus a
    prefix of the queue) and ranks caps by deadlines missed, then the time the last of them
    finishes, then their summed finish times. Only a cap that misses fewer deadlines than the
    base verdict overrides it: where every deadline is lost anyway, throughput matters more.
    """
    head = queue[0] if queue else running[0]
    # The deadlines this step can still decide: the running batch and the next two batches' worth
    # of candidates (the queue is in urgency order; keeps the simulation short on long queues).
    near = (*running, *queue[: 2 * config.max_batch])
    limit = [s.id for s in near if s.explicit_deadline]
    if not limit:
        return None
    caps: list[int] = []
    rows = sum(s.unet_rows for s in running)
    images = sum(s.rows for s in running)
    if running:
        caps.append(rows)
    for c in queue:
        if images + c.rows > config.max_batch and (running or caps):
            break
        rows += c.unet_rows
        images += c.rows
        caps.append(rows)

    def score(cap: int | None) -> tuple[int, float, float]:
        finish = _simulate(running, queue, now, cap, config.max_batch, cost, key, set(limit))
        seqs = {s.id: s for s in (*running, *queue)}
        missed = sum(1 for sid in limit if finish.get(sid, math.inf) > seqs[sid].deadline)
        times = [finish.get(sid, math.inf) for sid in limit]
        return missed, max(times), sum(times)

    base_score = score(base.cap_rows)
    if base_score[0] == 0:
        return None
    best_cap, best = min(((c, score(c)) for c in caps), key=lambda cs: (cs[1], cs[0]))
    if best[0] >= base_score[0]:
        return None
    at_risk = base_score[0]
    why = (f"deadline: {at_risk} explicit deadline(s) missed at the {base.mode.value} cap; {best_cap} rows "
           f"misses {best[0]}, all done by +{best[1] - now:.2f}s")
    return BatchSizing(SizingMode.DEADLINE, best_cap, _cap_images(best_cap, head, config.max_batch), why)


def _simulate(running: Sequence[Seq], queue: Sequence[Seq], now: float, cap_rows: int | None, max_batch: int,
              cost: StepCostModel, key: Hashable, until: set[str]) -> dict[str, float]:
    """Finish times (planner clock) of continuous batching under a total-rows cap, on the cost curve.

    Requests join in queue order whenever they fit; the batch runs until one leaves. Stops once
    every id in `until` has finished. An estimate: later arrivals and other shapes are ignored.
    """
    active = [[s, s.steps_left] for s in running]
    pending = list(queue)
    finish: dict[str, float] = {}
    t = now
    while (active or pending) and not until <= finish.keys():
        rows = sum(a[0].unet_rows for a in active)
        images = sum(a[0].rows for a in active)
        while pending and (not active or (images + pending[0].rows <= max_batch
                                          and (cap_rows is None or rows + pending[0].unet_rows <= cap_rows))):
            c = pending.pop(0)
            active.append([c, c.steps_left])
            rows += c.unet_rows
            images += c.rows
        steps = max(1, min(left for _, left in active))
        t += steps * cost.step_seconds(key, rows)
        for a in active:
            a[1] -= steps
            if a[1] <= 0:
                finish[a[0].id] = t
        active = [a for a in active if a[1] > 0]
    return finish


def apply_plan(seqs: dict[str, Seq], plan: StepPlan, now: float | None = None) -> None:
    """Move seqs to the phases the plan puts them in (the engine and the replay share this);
    with `now`, account pause time (`coschedule`'s bound on how long a video stays paused)."""
    for sid in plan.paused:
        seqs[sid].phase = Phase.PAUSED
        seqs[sid].paused_at = now
    for sid in plan.batch:
        seq = seqs[sid]
        if seq.paused_at is not None and now is not None:
            seq.paused_s += now - seq.paused_at
        seq.paused_at = None
        seq.phase = Phase.RUNNING


@dataclass(frozen=True)
class Retired:
    """Who leaves the batch after a step: finished (decode them) and failed (report the error)."""

    finished: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


def update(seqs: dict[str, Seq], plan: StepPlan, result: StepResult) -> Retired:
    """Account for one executed step: advance who stepped, retire who finished or failed.

    The one place work leaves the batch, shared by the live engine and the benchmark replay;
    it removes the retired from `seqs`.
    """
    finished: list[str] = []
    for sid in result.stepped:
        seq = seqs[sid]
        seq.steps_done += 1
        if seq.steps_left <= 0:
            finished.append(sid)
    failed = [sid for sid in plan.batch if sid in result.failed]
    for sid in finished + failed:
        seqs.pop(sid, None)
    return Retired(finished=tuple(finished), failed=tuple(failed))
