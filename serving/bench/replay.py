"""Discrete-event replay of the engine policies on a measured cost table.

Live timings on a shared 2-core machine drift ±10–15 % from minute to minute, so the
benchmark also replays the same trace against the step costs it measured in the same run.
The replay drives the *same* `StepPlanner` the live engine uses; only time is simulated.

Conservative by design: prompt encoding and VAE decoding are charged to the same device
as the denoising steps (serialised with them), although the live engine runs them off the
step loop. On a CPU they do compete for the same cores; on a GPU the real engine does better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stepfleet.serving.bench.trace import TraceRequest, latency_stats
from stepfleet.serving.contracts import StepResult
from stepfleet.serving.costmodel import StepCostModel
from stepfleet.serving.planner import (
    DEFAULT_SLO_SCALE,
    PlannerConfig,
    Seq,
    StepPlanner,
    apply_plan,
    update,
)


@dataclass(frozen=True)
class CostTable:
    """What one run measured: step seconds by UNet rows, and per-request fixed costs."""

    step_s_by_rows: dict[int, float]
    encode_s: float
    decode_s: float
    #: Per-step seconds of the plain pipeline (one request, guidance doubling the rows).
    fifo_step_s: float
    fifo_overhead_s: float  # encode + decode + pipeline set-up, per request

    def step_s(self, unet_rows: int) -> float:
        return self.cost_model("x").step_seconds("x", unet_rows)

    def cost_model(self, shape: tuple[int, int, int] | str) -> StepCostModel:
        """An engine cost model calibrated with this table, as a warmed-up worker's would be."""
        model = StepCostModel()
        model.calibrate(shape, self.step_s_by_rows)
        return model

    def fifo_service_s(self, steps: int) -> float:
        return self.fifo_overhead_s + steps * self.fifo_step_s


def fifo_capacity_rps(table: CostTable, step_mix: Sequence[int]) -> float:
    mean_service = sum(table.fifo_service_s(s) for s in step_mix) / len(step_mix)
    return 1.0 / mean_service


def replay_fifo(trace: Sequence[TraceRequest], table: CostTable) -> dict[str, float]:
    now = 0.0
    finishes = []
    for r in sorted(trace, key=lambda r: r.arrival_s):
        now = max(now, r.arrival_s) + table.fifo_service_s(r.steps)
        finishes.append(now)
    return latency_stats([r.arrival_s for r in sorted(trace, key=lambda r: r.arrival_s)], finishes)


def peer_call_s(table: CostTable, group: int, steps: int) -> float:
    """One plain-pipeline call on `group` requests of `steps` steps, from the measured table.

    The single-request pipeline's own figures, with its step scaled by the engine's measured
    batch curve (a pipeline batch of n runs the same UNet on 2n rows) and each extra request's
    encode and decode added.
    """
    scale = table.step_s(2 * group) / table.step_s(2)
    return table.fifo_overhead_s + (group - 1) * (table.encode_s + table.decode_s) + steps * table.fifo_step_s * scale


def replay_peer(trace: Sequence[TraceRequest], table: CostTable, max_batch: int, wait_s: float = 0.1) -> dict[str, float]:
    """`live.serve_dynamic_batches` (Ray Serve's `@serve.batch`, LitServe) on simulated time.

    The worker takes the first waiting request, collects more until it holds `max_batch` or
    `wait_s` has passed, splits them into groups of equal step counts (in order of first
    appearance) and runs each group as one pipeline call; its requests finish when the call ends.
    """
    pending = sorted(trace, key=lambda r: r.arrival_s)
    arrivals: list[float] = []
    finishes: list[float] = []
    now, i = 0.0, 0
    while i < len(pending):
        started = max(now, pending[i].arrival_s)
        close = started + wait_s
        batch = [pending[i]]
        i += 1
        while len(batch) < max_batch and i < len(pending) and pending[i].arrival_s <= close:
            batch.append(pending[i])
            i += 1
        now = max(started, batch[-1].arrival_s) if len(batch) == max_batch else close
        groups: dict[int, list[TraceRequest]] = {}
        for r in batch:
            groups.setdefault(r.steps, []).append(r)
        for steps, group in groups.items():
            now += peer_call_s(table, len(group), steps)
            arrivals.extend(r.arrival_s for r in group)
            finishes.extend(now for _ in group)
    return latency_stats(arrivals, finishes)


def replay_engine(
    trace: Sequence[TraceRequest],
    table: CostTable,
    config: PlannerConfig,
    guidance_rows: int = 2,
    slo_scale: float = DEFAULT_SLO_SCALE,
    shape: tuple[int, int, int] = (4, 32, 32),
) -> dict[str, float]:
    """Simulate the step loop under `config` (continuous or static) on the measured costs.

    The planner's cost model starts from the table as a calibrated worker's does and learns from
    every simulated step, as the live engine's does; the steps' true durations come from a
    separate copy of the table, so learning cannot feed back into the simulated clock.
    """
    truth = table.cost_model(shape)
    return simulate_step_loop(
        [(r.id, r.arrival_s, r.steps) for r in trace],
        StepPlanner(config, table.cost_model(shape)),
        encode_s=table.encode_s,
        decode_s=table.decode_s,
        step_s=lambda batch: truth.step_seconds(shape, len(batch) * guidance_rows),
        shape=shape,
        unet_rows=guidance_rows,
        slo_scale=slo_scale,
        learn=True,
    )


def simulate_step_loop(
    requests: Sequence[tuple[str, float, int]],
    planner: StepPlanner,
    encode_s: float,
    decode_s: float,
    step_s: Callable[[Sequence[str]], float],
    shape: tuple[int, int, int],
    unet_rows: int = 2,
    slo_scale: float = DEFAULT_SLO_SCALE,
    learn: bool = False,
) -> dict[str, float]:
    """The engine's step loop on simulated time: arrivals, one plan per step, retirements.

    `requests` are (id, arrival seconds, steps), one image each; `step_s(batch ids)` says how
    long one step of that batch takes. Encoding and decoding are charged to the same device,
    serialised with the steps (conservative; see the module docstring). With `learn`, each
    step's duration feeds the planner's cost model at simulated time, as the live engine's steps do.
    """
    pending = sorted(requests, key=lambda r: r[1])
    arrivals: dict[str, float] = {}
    finishes: dict[str, float] = {}
    seqs: dict[str, Seq] = {}
    now = 0.0
    i = 0
    while i < len(pending) or seqs:
        # Admit every arrival up to now; each costs an encode on the shared device.
        while i < len(pending) and pending[i][1] <= now:
            rid, arrival, steps = pending[i]
            i += 1
            now += encode_s
            solo = steps * planner.cost.step_seconds(shape, unet_rows)
            seqs[rid] = Seq(
                id=rid,
                shape=shape,
                rows=1,
                unet_rows=unet_rows,
                steps_total=steps,
                arrival=arrival,
                deadline=arrival + slo_scale * solo,
            )
            arrivals[rid] = arrival
        plan = planner.plan(seqs.values(), now)
        if plan.idle:
            nxt = [pending[i][1]] if i < len(pending) else []
            if plan.wake_at is not None:
                nxt.append(plan.wake_at)
            if not nxt:
                break  # nothing runnable and nothing coming: cannot happen with valid plans
            now = max(now, min(nxt))
            continue
        apply_plan(seqs, plan)
        seconds = step_s(plan.batch)
        now += seconds
        if learn:
            planner.cost.observe(shape, len(plan.batch) * unet_rows, seconds, at=now)
        for sid in update(seqs, plan, StepResult(stepped=plan.batch, seconds=seconds)).finished:
            now += decode_s
            finishes[sid] = now
    ids = sorted(finishes)
    return latency_stats([arrivals[k] for k in ids], [finishes[k] for k in ids])


__all__ = ["CostTable", "fifo_capacity_rps", "peer_call_s", "replay_engine", "replay_fifo", "replay_peer",
           "simulate_step_loop"]
