"""The step-level engine: a loop that runs one batched denoising step at a time.

Each turn: take in requests that became ready, drop cancelled ones, ask the pure
`StepPlanner` for this step's plan, execute it (one model call for the planned batch, with
failures isolated per request into a `StepResult`), then `planner.update` retires finished
and failed requests — in that one place. Requests therefore join and leave the running
batch at step boundaries. The engine talks to the runner only through `serving.contracts`.

Prompt encoding and VAE decoding run on a separate auxiliary thread so they never stall
the batch on accelerators, and inline between steps on the CPU, where a second torch
thread slows every step (see `serving.auxwork`). Callers get a `concurrent.futures.Future`
they can await from asyncio. A failure in one request (bad tensor, scheduler error) fails
that request only; the loop goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from stepfleet.serving.auxwork import AuxWork, resolve_aux_mode
from stepfleet.serving.compiled.buckets import RowBuckets
from stepfleet.serving.contracts import Decoded, EditPath, Prepared, RequestKind, Runner, StepResult
from stepfleet.serving.coschedule import CoScheduleConfig
from stepfleet.serving.costmodel import StepCostModel, cost_key, key_label
from stepfleet.serving.params import GenerationParams
from stepfleet.serving.planner import (
    DEFAULT_SLO_SCALE,
    Phase,
    PlannerConfig,
    Seq,
    StepPlan,
    StepPlanner,
    apply_plan,
    update,
)

if TYPE_CHECKING:
    import torch

    from stepfleet.serving.contracts import ImageBatch

S = TypeVar("S")
T = TypeVar("T")

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine will not take more work now; `retry_after_s` is when it likely will."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full; retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The engine is draining for shutdown and accepts no new requests."""


class RequestCancelled(Exception):
    """The request was cancelled (its client went away) before it finished."""


class EngineObserver(Protocol):
    """Hooks for metrics; `serving.metrics.WorkerMetrics` implements them."""

    def on_step(self, seconds: float, batch_images: int, queue_depth: int) -> None: ...
    def on_finish(self, request: EngineRequest, outcome: str) -> None: ...
    def on_preempt(self, count: int) -> None: ...
    def on_batching(self, report: BatchingReport) -> None: ...


@dataclass(frozen=True)
class BatchingReport:
    """How the engine sizes batches now: the planner's last verdict and the curves behind it.

    Shown in `/v1/load`, exported to `/metrics` and logged at info when it changes, because a
    batch cap nobody could see once cost a worker its throughput under overload (issue 21).
    """

    mode: str  # planner.SizingMode value: light, backlog or deadline
    cap_images: int  # images the last step's head request could share a step with
    cap_rows: int | None  # the same in UNet rows; None: no cost-based cap
    reason: str
    #: Step seconds by UNet rows per cost key (`costmodel.key_label`), as batch sizing compares them.
    curves: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; defaults fit a small CPU worker."""

    max_batch: int = 4  # images per model call (classifier-free guidance doubles the rows)
    max_queue: int = 64  # requests accepted but not yet started; beyond it, 429
    preemption: bool = True
    policy: str = "continuous"  # or "static" (request-level batching, a benchmark baseline)
    static_wait_s: float = 0.5
    #: A request without `deadline_ms` is due after this many times its solo service time:
    #: it orders waiting work shortest-first while still ageing long requests in.
    slo_scale: float = DEFAULT_SLO_SCALE
    idle_poll_s: float = 0.05
    #: Changes of batch sizing and of the learned step-cost curve are logged at info at most
    #: this often (a queue at the edge of a backlog can flip the rule every step).
    batching_log_s: float = 5.0
    #: Per-kind SLOs (seconds): the deadline of an image or a video request without `deadline_ms`
    #: (DiffusionService `slo.image`/`slo.video`); None: `slo_scale` x its solo service time. A
    #: per-kind SLO is a real target, so it counts as an explicit deadline (`serving.coschedule`).
    slo_image_s: float | None = None
    slo_video_s: float | None = None
    #: How running videos yield to images (pause them, bounds); `coschedule.CoScheduleConfig`.
    coschedule: CoScheduleConfig = field(default_factory=CoScheduleConfig)
    #: Where prompt encoding and VAE decoding run: "thread", "inline" (between steps, on the
    #: loop thread) or "auto" (inline when the runner's device is the CPU).
    aux: str = "auto"
    #: A compiled worker's denoiser row buckets (`serving.compiled.buckets`); None: any batch size.
    row_buckets: tuple[int, ...] | None = None


@dataclass
class EngineRequest(Generic[S]):
    id: str
    params: GenerationParams
    seed: int
    arrival: float
    future: Future[EngineResult] = field(default_factory=Future)
    seq: Seq | None = None
    prepared: Prepared[S] | None = None
    cancelled: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    kind: RequestKind = RequestKind.GENERATION

    @property
    def deadline_met(self) -> bool | None:
        if self.seq is None or self.finished_at is None or not self.seq.explicit_deadline:
            return None
        return self.finished_at <= self.seq.deadline


@dataclass(frozen=True)
class EngineResult:
    images: ImageBatch  # PIL images
    seed: int
    queue_s: float
    total_s: float
    steps: int
    #: Final latents (on the CPU) when the engine keeps them, for equality checks.
    latents: torch.Tensor | None = None
    #: For edits: cached (masked compute from the template's activations) or full.
    edit_path: EditPath | None = None


class _NullObserver:
    def on_step(self, seconds: float, batch_images: int, queue_depth: int) -> None:
        pass

    def on_finish(self, request: EngineRequest, outcome: str) -> None:
        pass

    def on_preempt(self, count: int) -> None:
        pass

    def on_batching(self, report: BatchingReport) -> None:
        pass


class Engine(Generic[S]):
    """Owns the step loop thread, the auxiliary thread, and every live request."""

    def __init__(
        self,
        runner: Runner[S],
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        cost: StepCostModel | None = None,
    ) -> None:
        self.runner = runner
        self.config = config or EngineConfig()
        self.observer = observer or _NullObserver()
        self.clock = clock
        self.cost = cost or StepCostModel()
        self.planner = StepPlanner(
            PlannerConfig(
                max_batch=self.config.max_batch,
                policy="static" if self.config.policy == "static" else "continuous",
                preemption=self.config.preemption and self.config.policy != "static",
                static_wait_s=self.config.static_wait_s,
                coschedule=self.config.coschedule,
                row_buckets=RowBuckets(self.config.row_buckets) if self.config.row_buckets else None,
            ),
            self.cost,
        )
        self._cond = threading.Condition()
        self._preparing: dict[str, EngineRequest[S]] = {}
        self._live: dict[str, EngineRequest[S]] = {}  # ready: waiting, running or paused
        self._ids = itertools.count()
        self._aux = AuxWork(resolve_aux_mode(self.config.aux, runner.device_type), self._wake)
        self._calls: list[tuple[Callable[[], object], Future]] = []  # run on the loop thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self.keep_latents = False  # the benchmark turns this on to check batch invariance
        self._batching = BatchingReport(mode="light", cap_images=self.config.max_batch, cap_rows=None,
                                        reason="no step yet")
        self._batching_logged: tuple[object, ...] = ()
        self._batching_logged_at = -math.inf
        self._curves_at = -math.inf
        self._curves_logged: dict[str, dict[int, float]] = {}

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stepfleet-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with `drain`, let running and queued ones finish first."""
        with self._cond:
            self._accepting = False
            if not drain:
                for req in list(self._live.values()) + list(self._preparing.values()):
                    req.cancelled = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        while drain and time.monotonic() < deadline:
            with self._cond:
                if not self._live and not self._preparing:
                    break
            time.sleep(0.01)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self._aux.shutdown()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- client side ---------------------------------------------------------------
    def submit(
        self, params: GenerationParams, request_id: str | None = None, kind: RequestKind = RequestKind.GENERATION
    ) -> EngineRequest[S]:
        """Queue a request; raises QueueFull (with a retry estimate) or ShuttingDown."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("worker is shutting down")
            if self.queue_depth() >= self.config.max_queue:
                raise QueueFull(self.retry_after_s())
            seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
            req = EngineRequest(
                id=request_id or f"req-{next(self._ids)}", params=params, seed=seed, arrival=self.clock(), kind=kind
            )
            self._preparing[req.id] = req
        self._aux.submit(self._prepare, req)
        return req

    def call_on_loop(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the step loop's thread at the next step boundary (torch work belongs there)."""
        fut: Future[T] = Future()
        with self._cond:
            if self._thread is None or self._stopping:
                raise RuntimeError("the engine's loop is not running")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def calibrate(self, width: int, height: int, guidance_scale: float, reps: int = 3,
                  timeout: float = 600.0) -> dict[int, float]:
        """Time the step-cost curve for this size (1..max_batch images) and size batches by it.

        The worker calls this after warm-up: online samples of batch sizes the engine rarely
        runs are too few to compare fairly. The curve only seeds the online estimate, which
        takes over as steps are measured (see `serving.costmodel`).
        """
        from stepfleet.serving.calibration import step_curve

        shape = self.runner.latent_shape(width, height)

        def measure() -> dict[int, float]:
            curve = step_curve(self.runner, width, height, guidance_scale, self.config.max_batch, reps)
            with self._cond:  # other threads read the model (load, backlog, deadlines)
                self.cost.calibrate(shape, curve)
            self._curves_at = -math.inf  # report the seeded curve at the next step
            return curve

        return self.call_on_loop(measure).result(timeout=timeout)

    def cancel(self, request_id: str) -> bool:
        """Mark a request cancelled; its batch slot frees at the next step boundary."""
        with self._cond:
            req = self._live.get(request_id) or self._preparing.get(request_id)
            if req is None:
                return False
            req.cancelled = True
            self._cond.notify_all()
            return True

    def queue_depth(self) -> int:
        """Requests accepted but not yet stepped (being encoded, or waiting for a slot)."""
        waiting = sum(1 for r in self._live.values() if r.seq is not None and r.seq.phase is Phase.WAITING)
        return len(self._preparing) + waiting

    def load(self) -> dict[str, float]:
        """What the router balances on: counts and outstanding work in seconds and step units."""
        with self._cond:
            seqs = [r.seq for r in self._live.values() if r.seq is not None]
            pending = list(self._preparing.values())
            phases = [s.phase for s in seqs]
            step_units = sum(s.steps_left * s.unet_rows for s in seqs)
            step_units += sum(r.params.num_inference_steps * r.params.n * 2 for r in pending)
            return {
                "waiting": float(phases.count(Phase.WAITING) + len(pending)),
                "running": float(phases.count(Phase.RUNNING)),
                "paused": float(phases.count(Phase.PAUSED)),
                "step_units": float(step_units),
                "backlog_s": self._backlog_s(),
                "max_batch": float(self.config.max_batch),
                "batch_cap": float(self._batching.cap_images),
            }

    def kinds(self) -> tuple[dict[str, int], int]:
        """(requests waiting for their first step by kind, videos held paused), as of now: the
        scrape reads these, so a gauge never keeps a count from before requests were cancelled."""
        with self._cond:
            live = list(self._live.values()) + list(self._preparing.values())
        waiting = {"image": 0, "video": 0}
        paused = 0
        for r in live:
            kind = "video" if r.kind is RequestKind.VIDEO else "image"
            phase = r.seq.phase if r.seq is not None else Phase.WAITING
            if phase is Phase.WAITING:
                waiting[kind] += 1
            elif phase is Phase.PAUSED and kind == "video":
                paused += 1
        return waiting, paused

    def batching(self) -> BatchingReport:
        """The current batch sizing and learned curves (a snapshot taken on the loop thread)."""
        return self._batching

    def retry_after_s(self) -> float:
        return max(1.0, math.ceil(self._backlog_s()))

    def _backlog_s(self) -> float:
        """Seconds to finish everything accepted, if the batch stays full."""
        total = 0.0
        mb = self.config.max_batch
        for r in list(self._live.values()) + list(self._preparing.values()):
            # A request still being prepared is priced by its own shape (a video's frames included).
            key = r.seq.cost_key if r.seq else self.runner.request_shape(r.params)
            rows_per_image = 2 if r.params.guidance_scale > 1 else 1
            steps = r.seq.steps_left if r.seq else r.params.num_inference_steps
            full_step = self.cost.step_seconds(key, mb * rows_per_image)
            total += steps * full_step * r.params.n / mb
        return total

    # -- auxiliary thread ------------------------------------------------------------
    def _prepare(self, req: EngineRequest[S]) -> None:
        if req.cancelled:
            self._finish(req, "cancelled", RequestCancelled(req.id))
            return
        try:
            prepared = self.runner.prepare(req.params, req.seed)
        except Exception as exc:  # a bad request must not take the engine down
            log.exception("prepare failed for %s", req.id)
            self._finish(req, "error", exc)
            return
        p = req.params
        # Edits on cached template activations cost differently from full steps of the same shape.
        key = cost_key(prepared.shape, prepared.cost_variant)
        with self._cond:  # the loop thread writes the cost model under this lock
            solo = self.cost.service_seconds(key, prepared.unet_rows, prepared.steps)
        kind_slo = self.config.slo_video_s if req.kind is RequestKind.VIDEO else self.config.slo_image_s
        explicit = p.deadline_ms is not None or kind_slo is not None
        budget = (p.deadline_ms / 1000.0 if p.deadline_ms is not None else kind_slo if kind_slo is not None
                  else self.config.slo_scale * solo)
        req.prepared = prepared
        req.seq = Seq(
            id=req.id,
            shape=prepared.shape,
            rows=p.n,
            unet_rows=prepared.unet_rows,
            steps_total=prepared.steps,
            arrival=req.arrival,
            deadline=req.arrival + budget,
            explicit_deadline=explicit,
            priority=int(p.priority),
            cost_key=key,
            kind="video" if req.kind is RequestKind.VIDEO else "image",
        )
        with self._cond:
            self._preparing.pop(req.id, None)
            self._live[req.id] = req
            self._cond.notify_all()

    def _decode(self, req: EngineRequest[S]) -> None:
        assert req.prepared is not None
        try:
            decoded: Decoded = self.runner.decode(req.prepared.state, keep_latents=self.keep_latents)
        except Exception as exc:
            log.exception("decode failed for %s", req.id)
            self._finish(req, "error", exc)
            return
        req.prepared = None
        req.finished_at = self.clock()
        result = EngineResult(
            images=decoded.images,
            seed=req.seed,
            queue_s=(req.started_at or req.finished_at) - req.arrival,
            total_s=req.finished_at - req.arrival,
            steps=req.params.num_inference_steps,
            latents=decoded.latents,
            edit_path=decoded.edit_path,
        )
        self._finish(req, "ok", result=result)

    def _finish(self, req: EngineRequest[S], outcome: str, error: BaseException | None = None,
                result: EngineResult | None = None) -> None:
        with self._cond:
            self._preparing.pop(req.id, None)
            self._live.pop(req.id, None)
            self._cond.notify_all()
        if req.finished_at is None:
            req.finished_at = self.clock()
        try:
            self.observer.on_finish(req, outcome)
        except Exception:  # metrics must never break serving
            log.exception("observer failed")
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result)

    # -- step loop ---------------------------------------------------------------------
    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, fut in calls:
            try:
                fut.set_result(fn())
            except Exception as exc:  # the caller gets it; the loop goes on
                fut.set_exception(exc)

    def _loop(self) -> None:
        while True:
            self._aux.run_pending()  # inline mode: encode new requests, decode finished ones
            self._run_calls()
            with self._cond:
                if self._stopping:
                    break
                cancelled = [r for r in self._live.values() if r.cancelled]
            for req in cancelled:
                self._finish(req, "cancelled", RequestCancelled(req.id))
            with self._cond:
                seqs = {r.id: r.seq for r in self._live.values() if r.seq is not None}
                plan = self.planner.plan(seqs.values(), self.clock())
                if plan.idle:
                    if self._aux.pending() or self._calls:
                        continue
                    timeout = self.config.idle_poll_s
                    if plan.wake_at is not None:
                        timeout = min(timeout, max(0.0, plan.wake_at - self.clock()))
                    self._cond.wait(timeout=timeout)
                    continue
                apply_plan(seqs, plan, self.clock())
                batch = [self._live[sid] for sid in plan.batch]
                depth = self.queue_depth()
            if plan.paused:
                self.observer.on_preempt(len(plan.paused))
                log.debug("plan: %s", "; ".join(plan.reasons))
            self._report_batching(plan)
            self._report_kinds(plan, seqs)
            result = self._execute(plan, batch)
            self._retire(plan, batch, result, seqs, depth)
        self._aux.run_pending()  # decodes queued by the last steps
        with self._cond:
            calls, self._calls = self._calls, []
        for _, fut in calls:
            fut.set_exception(ShuttingDown("the engine stopped"))

    def _execute(self, plan: StepPlan, batch: list[EngineRequest[S]]) -> StepResult:
        """One model call for the plan's batch; if it fails, each request is retried alone.

        One call serves the whole batch, so a failure cannot be pinned on anyone: only the
        requests that also fail alone fail.
        """
        now = self.clock()
        for req in batch:
            if req.started_at is None:
                req.started_at = now
        states = [req.prepared.state for req in batch if req.prepared is not None]
        t0 = time.perf_counter()
        try:
            self.runner.step(states)
        except Exception:
            log.exception("batched step failed; isolating")
            stepped: list[str] = []
            failed: dict[str, BaseException] = {}
            for req, state in zip(batch, states, strict=True):
                try:
                    self.runner.step([state])
                    stepped.append(req.id)
                except Exception as own:
                    failed[req.id] = own
            return StepResult(stepped=tuple(stepped), failed=failed)
        return StepResult(stepped=plan.batch, seconds=time.perf_counter() - t0)

    def _retire(self, plan: StepPlan, batch: list[EngineRequest[S]], result: StepResult, seqs: dict[str, Seq],
                depth: int) -> None:
        """Learn the step's cost, then let `planner.update` say who finished or failed."""
        if not result.failed:
            rows = sum(r.seq.unet_rows for r in batch if r.seq is not None)
            keys = {r.seq.cost_key for r in batch if r.seq is not None}
            with self._cond:  # other threads read the model (load, backlog, deadlines)
                if len(keys) == 1:
                    self.cost.observe(keys.pop(), rows, result.seconds, at=self.clock())
                else:  # a mixed batch informs the shape's estimate, not any variant's batch sizing
                    self.cost.observe(plan.shape, rows, result.seconds, reference=False, at=self.clock())
            self.observer.on_step(result.seconds, sum(r.seq.rows for r in batch if r.seq is not None), depth)
        retired = update(seqs, plan, result)
        by_id = {req.id: req for req in batch}
        with self._cond:
            for sid in retired.finished + retired.failed:
                self._live.pop(sid, None)
        for sid in retired.failed:
            self._finish(by_id[sid], "error", result.failed[sid])
        for sid in retired.finished:
            self._aux.submit(self._decode, by_id[sid])

    def _report_kinds(self, plan: StepPlan, seqs: dict[str, Seq]) -> None:
        """Images and videos apart, for an observer that has `on_kinds` (`WorkerMetrics`)."""
        hook = getattr(self.observer, "on_kinds", None)
        if hook is None:
            return
        waiting = {"image": 0, "video": 0}
        paused_videos = 0
        for s in seqs.values():
            if s.phase is Phase.WAITING:
                waiting[s.kind] = waiting.get(s.kind, 0) + 1
            elif s.phase is Phase.PAUSED and s.kind == "video":
                paused_videos += 1
        try:
            hook(waiting, paused_videos, sum(1 for sid in plan.paused if seqs[sid].kind == "video"))
        except Exception:  # metrics must never break serving
            log.exception("observer failed")

    def _report_batching(self, plan: StepPlan) -> None:
        """Keep the batching snapshot current; tell the observer on change, log at info (rate-limited).

        Runs on the loop thread, the only writer of the cost model, so reading it needs no lock.
        The curves are re-read at most once a second: medians over every point are not free.
        """
        sizing = plan.sizing
        if sizing is None:
            return
        now = self.clock()
        old = self._batching
        curves = old.curves
        if now - self._curves_at >= 1.0:
            self._curves_at = now
            curves = {key_label(k): dict(sorted(c.items())) for k in self.cost.keys()
                      if (c := self.cost.reference_curve(k))}
        report = BatchingReport(mode=sizing.mode.value, cap_images=sizing.cap_images, cap_rows=sizing.cap_rows,
                                reason=sizing.why, curves=curves)
        changed = (report.mode, report.cap_images, report.curves) != (old.mode, old.cap_images, old.curves)
        self._batching = report
        if changed:
            try:
                self.observer.on_batching(report)
            except Exception:  # metrics must never break serving
                log.exception("observer failed")
        if now - self._batching_logged_at < self.config.batching_log_s:
            return
        state = (report.mode, report.cap_images)
        if state != self._batching_logged:
            log.info("batch sizing: %s, up to %d image(s) per step (%s)", report.mode, report.cap_images,
                     report.reason)
        moved = {k: c for k, c in curves.items() if _moved(self._curves_logged.get(k, {}), c)}
        for label, curve in moved.items():
            log.info("step cost by UNet rows at %s: %s", label,
                     ", ".join(f"{rows}: {sec * 1000:.1f} ms" for rows, sec in curve.items()))
        if state != self._batching_logged or moved:
            self._batching_logged, self._batching_logged_at = state, now
            self._curves_logged = {**self._curves_logged, **moved}

    # -- convenience ---------------------------------------------------------------------
    def generate(self, params: GenerationParams, timeout: float | None = None,
                 kind: RequestKind = RequestKind.GENERATION) -> EngineResult:
        """Submit and wait (for scripts and tests)."""
        return self.submit(params, kind=kind).future.result(timeout=timeout)

    def warmup(self, params: GenerationParams) -> None:
        """Run one full (short) request so the first user does not pay for lazy initialisation."""
        self.generate(params, timeout=600, kind=RequestKind.WARMUP)


def _moved(old: dict[int, float], new: dict[int, float], rel: float = 0.1) -> bool:
    """Whether a curve changed enough to log: a new point, or one that moved by more than `rel`."""
    return any(rows not in old or abs(sec / old[rows] - 1) > rel for rows, sec in new.items())
