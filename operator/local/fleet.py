"""The local fleet's pure parts: pools, the policy spec, observations, the router config.

Everything the `stepfleet up` loop decides goes through here as plain data, so the rules
are tested without processes or sockets:

- `parse_pools("cheap:0.10,fast:0.40")`: the `--pools` flag;
- `local_policy_spec(...)`: the `PolicySpec` the operator would build from a
  DiffusionService, with local defaults (a small model loads in seconds, not minutes, so
  the loop's delays are seconds too);
- `LoopMemory` + `control_step(...)`: one observe-decide pass, the operator's own
  functions end to end — worker `/metrics` differenced between two scrapes
  (`scraping.metrics_from_scrapes`), then the one control step the kopf timer and the
  simulator run (`policy.control_step`: demand fit, `decide`);
- `shortages(...)`: the local capacity signal, a worker meant to serve that has not been
  ready for longer than a grace period (the operator's "replicas that never become ready");
- `router_config(...)`: the `router.yaml` for the ready workers and the plan's weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import yaml

from stepfleet.operator.loop import scraping
from stepfleet.operator.loop.measured import Metrics, PoolMetrics
from stepfleet.operator.loop.specmap import DEFAULT_LATENCY_SHARE
from stepfleet.operator.policy import (
    ControlSettings,
    Observation,
    Plan,
    PolicySpec,
    PolicyState,
    PoolObservation,
    PoolSpec,
    Signals,
    SloSpec,
    StepMemory,
)
from stepfleet.operator.policy import control_step as policy_step
from stepfleet.serving.router.config import CONFIG_VERSION

from .supervise import WorkerView


@dataclass(frozen=True)
class LocalPool:
    """One pool of the local fleet: a name and the price per hour it pretends to cost."""

    name: str
    price_per_hour: float


def parse_pools(text: str) -> tuple[LocalPool, ...]:
    """`NAME:PRICE[,NAME:PRICE...]` → pools; raises ValueError naming the bad part."""
    pools: list[LocalPool] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, price = part.partition(":")
        name = name.strip()
        if not name or not all(c.isalnum() or c == "-" for c in name) or name[0] == "-":
            raise ValueError(f"pool {part!r}: the name must be letters, digits and '-'")
        try:
            value = float(price) if sep else 0.0
        except ValueError:
            raise ValueError(f"pool {part!r}: price {price!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"pool {part!r}: price must be a non-negative number")
        if any(p.name == name for p in pools):
            raise ValueError(f"pool {name!r} is given twice")
        pools.append(LocalPool(name, value))
    if not pools:
        raise ValueError("no pools given (expected NAME:PRICE[,NAME:PRICE...])")
    return tuple(pools)


@dataclass(frozen=True)
class LocalSettings:
    """The local loop's knobs (command-line flags); seconds and requests per second."""

    interval_s: float = 5.0
    min_workers: int = 1
    max_workers: int = 2
    #: Requests per second one worker is assumed to serve (no measurement is taken).
    throughput_rps_per_worker: float = 1.0
    slo_latency_s: float = 10.0
    slo_percentile: float = 0.95
    #: Seconds a new worker takes to be ready (the policy plans this far ahead).
    provision_s: float = 20.0
    #: A worker meant to serve but not ready for this long marks its pool capacity-short.
    ready_grace_s: float = 120.0
    mode: str = "auto"


def local_policy_spec(pools: Sequence[LocalPool], settings: LocalSettings) -> PolicySpec:
    """The policy's spec for local pools: the operator's defaults scaled to seconds."""
    interval = settings.interval_s
    return PolicySpec(
        slo=SloSpec(latency_s=settings.slo_latency_s, percentile=settings.slo_percentile),
        pools=tuple(
            PoolSpec(
                name=p.name,
                price_per_hour=p.price_per_hour,
                throughput_rps_per_replica=settings.throughput_rps_per_worker,
                latency_s=settings.slo_latency_s * DEFAULT_LATENCY_SHARE,
                provision_s=settings.provision_s,
                min_replicas=settings.min_workers,
                max_replicas=settings.max_workers,
            )
            for p in pools
        ),
        mode=settings.mode,  # type: ignore[arg-type]
        control=ControlSettings(
            interval_s=interval,
            dwell_s=max(6 * interval, 3 * settings.provision_s),
            recovery_window_s=max(3 * interval, settings.provision_s),
            stabilization_s=max(6 * interval, 30.0),
        ),
    )


def initial_desired(pools: Sequence[LocalPool], settings: LocalSettings) -> dict[str, int]:
    """Workers per pool before the first decision: the minimum, and at least one."""
    return {p.name: max(1, settings.min_workers) for p in pools}


def shortages(workers: Sequence[WorkerView], now_s: float, grace_s: float) -> dict[str, float]:
    """pool -> since when a worker meant to serve has not been ready, past the grace period."""
    out: dict[str, float] = {}
    for w in workers:
        if w.phase in ("starting", "crashed") and w.unready_since_s is not None and now_s - w.unready_since_s > grace_s:
            out[w.pool] = min(out.get(w.pool, w.unready_since_s), w.unready_since_s)
    return out


def pool_observations(
    pools: Sequence[LocalPool],
    desired: Mapping[str, int],
    workers: Sequence[WorkerView],
    metrics: Metrics,
    short: Mapping[str, float],
) -> tuple[PoolObservation, ...]:
    """Each local pool as the control step sees it (workers in place of a Deployment's pods)."""
    observed = []
    for pool in pools:
        mine = [w for w in workers if w.pool == pool.name]
        ready = sum(1 for w in mine if w.phase == "ready" and not w.hung)
        want = int(desired.get(pool.name, 0))
        m = metrics.pools.get(pool.name) or PoolMetrics()
        observed.append(PoolObservation(
            name=pool.name,
            desired_replicas=want,
            ready_replicas=ready,
            pending_replicas=max(0, want - ready),
            latency_s=m.latency_s,
            queue_depth=m.queue_depth,
            capacity_short_since=short.get(pool.name),
        ))
    return tuple(observed)


def build_observation(
    now_s: float,
    pools: Sequence[LocalPool],
    desired: Mapping[str, int],
    workers: Sequence[WorkerView],
    demand: tuple[float, float],
    metrics: Metrics,
    short: Mapping[str, float],
) -> Observation:
    """`decide`'s input directly (demand already estimated), for callers outside the step."""
    rate, trend = demand
    return Observation(now_s=now_s, arrival_rps=rate, arrival_trend_rps_per_s=trend,
                       pools=pool_observations(pools, desired, workers, metrics, short))


@dataclass
class LoopMemory:
    """What the local loop carries between runs: the control step's memory (as the operator
    keeps it in kopf's memo) and the last scrape."""

    step: StepMemory = field(default_factory=StepMemory)
    scrapes: dict[str, scraping.WorkerSample] = field(default_factory=dict)
    scraped_at: float | None = None

    @property
    def state(self) -> PolicyState:
        return self.step.state

    @property
    def plan(self) -> Plan | None:
        return self.step.plan

    @property
    def samples(self) -> tuple[tuple[float, float], ...]:
        return self.step.samples


def control_step(
    memory: LoopMemory,
    spec: PolicySpec,
    pools: Sequence[LocalPool],
    desired: Mapping[str, int],
    workers: Sequence[WorkerView],
    scrapes: Mapping[str, scraping.WorkerSample],
    now_s: float,
    ready_grace_s: float,
) -> Plan | None:
    """One observe-decide pass over this scrape of the ready workers (keyed by worker name).

    Updates `memory`; returns the plan, or None on the first scrape (rates need two).
    """
    previous, previous_at = memory.scrapes, memory.scraped_at
    memory.scrapes, memory.scraped_at = dict(scrapes), now_s
    if previous_at is None or now_s <= previous_at:
        return None
    worker_pools = {w.name: w.pool for w in workers}
    metrics = scraping.metrics_from_scrapes(
        previous, scrapes, worker_pools, [p.name for p in pools], now_s - previous_at, spec.slo.percentile,
    )
    signals = Signals(arrival_rps=metrics.arrival_rps, window_s=metrics.window_s, video_rps=metrics.video_rps,
                      pools=pool_observations(pools, desired, workers, metrics,
                                              shortages(workers, now_s, ready_grace_s)))
    plan, memory.step = policy_step(memory.step, signals, spec, now_s)
    return plan


def router_config(
    pools: Sequence[LocalPool],
    workers: Sequence[WorkerView],
    weights: Mapping[str, float] | None,
    model: str | None = None,
    control: Mapping | None = None,
) -> dict:
    """`router.yaml` for the ready workers (not those found hung); pools without one are left out.

    Without a plan yet (`weights` None) every pool weighs 1. `control` (`control_section`) is
    what the router's `GET /v1/fleet` shows of the loop's decisions.
    """
    out_pools = []
    for pool in pools:
        endpoints = sorted(w.url for w in workers
                           if w.pool == pool.name and w.phase == "ready" and not w.hung and w.url)
        if not endpoints:
            continue
        weight = 1.0 if weights is None else float(weights.get(pool.name, 0.0))
        out_pools.append({"name": pool.name, "endpoints": endpoints, "weight": round(weight, 6),
                          "accelerator": "cpu", "pricePerHour": pool.price_per_hour})
    config: dict = {"version": CONFIG_VERSION, "service": "local"}
    if model:
        config["model"] = model
    config["pools"] = out_pools
    if control:
        config["control"] = dict(control)
    return config


def render_router_config(config: Mapping) -> str:
    return "# written by `stepfleet up`; re-read by the router when it changes\n" + yaml.safe_dump(
        dict(config), sort_keys=False)
