"""Plans each denoising step: who joins, who continues, who is paused, who runs at all.

This is the scheduling brain of the step-level engine, kept pure (no torch, no clock, no
threads) so the live engine, the benchmark's discrete-event replay and the unit tests all
run the very same decisions. One call, one step: `plan` returns a `StepPlan`, the
engine applies it and runs one model call for `plan.batch`, and `update(plan, result)`
advances and retires work — the same three calls in the live engine and in the replay.

Ordering. Candidates (waiting and paused requests) are ranked by priority class, then by
earliest deadline, then by arrival. A request without an explicit deadline gets one derived
from its own solo service time (see `Engine`), so among equals shorter jobs come first but
an old long job still overtakes a fresh short one eventually.

Shapes. One model call needs one latent shape, so a step runs requests of a single shape.
The running group keeps its shape while it has members; a candidate of the running shape
is admitted only if no candidate of another shape outranks it, so an older request of
another shape is never starved: the group drains and that shape goes next.

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

from stepfleet.serving.contracts import StepResult
from stepfleet.serving.costmodel import StepCostModel


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

    def __post_init__(self) -> None:
        if not self.unet_rows:
            self.unet_rows = self.rows
        if self.cost_key is None:
            self.cost_key = self.shape

    @property
    def steps_left(self) -> int:
        return self.steps_total - self.steps_done

    def urgency(self) -> tuple[int, float, float, str]:
        """Sort key: smaller is more urgent."""
        return (-self.priority, self.deadline, self.arrival, self.id)


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
    min_batch_gain: float = 0.05


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
        running = [s for s in live if s.phase is Phase.RUNNING]
        cands = sorted((s for s in live if s.phase is not Phase.RUNNING), key=Seq.urgency)
        if not running and not cands:
            return StepPlan()
        reasons: list[str] = []
        paused: list[Seq] = []
        shape = running[0].shape if running else cands[0].shape

        if running and self.config.preemption:
            other = next((c for c in cands if c.shape != shape), None)
            if other is not None and other.priority > max(r.priority for r in running):
                reasons.append(f"switch shape for higher-priority {other.id}")
                paused.extend(running)
                running = []
                shape = other.shape

        batch = list(running)
        rows = sum(s.rows for s in batch)
        fence = next((c for c in cands if c.shape != shape), None)
        queue = [
            c
            for c in cands
            if c.shape == shape and c not in paused and (fence is None or c.urgency() < fence.urgency())
        ]
        admitted: list[Seq] = []
        # Batch sizing per cost variant: each kind of step grows only while its own measured
        # curve says one more row still pays.
        caps: dict[Hashable, int | None] = {}
        rows_of: dict[Hashable, int] = {}
        for s in batch:
            rows_of[s.cost_key] = rows_of.get(s.cost_key, 0) + s.unet_rows
        # A request with more images than a batch holds runs alone (the worker refuses such
        # requests, but a planner that waited for room would hold its whole shape back forever).
        while queue and (rows + queue[0].rows <= self.config.max_batch or not batch):
            key = queue[0].cost_key
            if key not in caps:
                gain = self.config.min_batch_gain
                caps[key] = self.cost.efficient_rows(key, gain) if gain else None
            have = rows_of.get(key, 0)
            if have and caps[key] is not None and have + queue[0].unet_rows > caps[key]:
                reasons.append(f"batch held at {have} rows: measured gain beyond {caps[key]} rows is too small")
                break
            c = queue.pop(0)
            batch.append(c)
            admitted.append(c)
            rows += c.rows
            rows_of[key] = have + c.unet_rows

        if queue and self.config.preemption:
            batch, rows = self._preempt(batch, running, queue, paused, admitted, rows, now, reasons)

        if not batch:
            return StepPlan(paused=tuple(s.id for s in paused), reasons=tuple(reasons))
        return StepPlan(
            batch=tuple(s.id for s in batch),
            admitted=tuple(s.id for s in admitted if s.phase is Phase.WAITING),
            resumed=tuple(s.id for s in admitted if s.phase is Phase.PAUSED),
            paused=tuple(s.id for s in paused),
            shape=shape,
            reasons=tuple(reasons),
        )

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


def apply_plan(seqs: dict[str, Seq], plan: StepPlan) -> None:
    """Move seqs to the phases the plan puts them in (the engine and the replay share this)."""
    for sid in plan.paused:
        seqs[sid].phase = Phase.PAUSED
    for sid in plan.batch:
        seqs[sid].phase = Phase.RUNNING


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
