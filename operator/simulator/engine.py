"""The event-driven, request-level simulation of one policy over one scenario.

Two streams meet here. Requests arrive in time order (pre-drawn, the same for every policy)
and each is routed at once: a pool by the router weights, then a replica of that pool by
the power of two choices (the less busy of two random ready replicas, as Envoy's and
most least-request balancers do), and that replica's FIFO queue fixes when the request
starts and finishes (see `fleet`). Everything else is a timed event on a heap — replicas becoming
ready or finishing their drain, scenario events (shortages, price changes, outages,
interruptions), and the controller's ticks — and is processed before the first request
that arrives at or after its time. At equal times, replica transitions come first, then
scenario events, then the controller, so a tick sees what happened at its instant.

The per-request path is a tight loop over plain lists; a million requests take seconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .controller import Actions, Controller
from .fleet import Fleet, Replica, SimPool
from .scenario import CapacityShort, Interrupt, Outage, PriceChange, Scenario
from .view import FleetView, RequestLog

_PRIORITY = {"ready": 0, "release": 0, "event": 1, "short_end": 1, "tick": 2, "react": 2}
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Draws:
    """Random numbers shared by every policy in a run (common random numbers)."""

    arrival_s: np.ndarray
    route_u: np.ndarray  # uniform [0, 1): picks the pool by weight
    pick_u: np.ndarray  # uniform [0, 1): picks the two replicas compared inside the pool
    service_z: np.ndarray  # standard normal: the request's service-time variation
    event_seed: int  # seeds which replicas an interruption takes

    @classmethod
    def draw(cls, arrival_s: np.ndarray, rng: np.random.Generator) -> Draws:
        n = len(arrival_s)
        return cls(arrival_s, rng.random(n), rng.random(n), rng.standard_normal(n),
                   int(rng.integers(0, 2**31 - 1)))


@dataclass
class Tick:
    t: float
    mode: str | None
    desired: tuple[int, ...]
    ready: tuple[int, ...]
    weights: tuple[float, ...]
    reasons: tuple[str, ...] = ()


@dataclass
class RunLog:
    policy: str
    scenario: Scenario
    log: RequestLog
    pool_cost_usd: dict[str, float]
    replica_hours: dict[str, float]
    mode_switches: int
    timeline: list[Tick] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def cost_usd(self) -> float:
        return sum(self.pool_cost_usd.values())


def simulate(scenario: Scenario, controller: Controller, draws: Draws,
             keep_reasons: bool = False) -> RunLog:
    started = time.perf_counter()
    heap: list[tuple[float, int, int, str, object]] = []
    sequence = itertools.count()

    def schedule(t: float, kind: str, payload: object) -> None:
        heapq.heappush(heap, (t, _PRIORITY[kind], next(sequence), kind, payload))

    fleet = Fleet(scenario, schedule)
    pools = fleet.pools
    npools = len(pools)
    for pool in pools:
        fleet.warm_start(pool, min(pool.spec.initial_replicas, pool.spec.max_replicas))
    for event in scenario.events:
        schedule(event.at_s, "event", event)
    schedule(0.0, "tick", None)

    log = RequestLog(draws.arrival_s)
    event_rng = np.random.default_rng(draws.event_seed)
    lookback = scenario.timeout_s + max(
        p.latency_s * (1 + 6 * p.service_cv) + 1.0 / p.throughput_rps_per_replica
        for p in scenario.pools) + 1.0
    timeline: list[Tick] = []
    switches = 0
    last_mode: list[str | None] = [None]
    cum: list[float] = _cumulative({p.name: len(p.ready) * p.spec.throughput_rps_per_replica
                                    for p in pools}, pools)

    def apply(actions: Actions, now: float) -> None:
        nonlocal cum, switches
        if actions.replicas is not None:
            for pool in pools:
                if pool.name in actions.replicas:
                    fleet.scale_to(pool, int(actions.replicas[pool.name]), now)
        if actions.weights is not None:
            cum = _cumulative(actions.weights, pools)
        if actions.mode is not None:
            if last_mode[0] is not None and actions.mode != last_mode[0]:
                switches += 1
            last_mode[0] = actions.mode

    react_s = controller.react_to_loss_s

    def lose(pool: SimPool, victims: list[Replica], now: float) -> None:
        serving = fleet.lose(pool, victims, now)
        log.fail_lost(serving, now, lookback)
        if victims and react_s is not None:
            schedule(now + react_s, "react", None)

    def handle(now: float, kind: str, payload: object) -> None:
        if kind == "ready":
            fleet.on_ready(payload, now)  # type: ignore[arg-type]
        elif kind == "release":
            fleet.on_release(payload, now)  # type: ignore[arg-type]
        elif kind == "short_end":
            fleet.end_shortage(payload, now)  # type: ignore[arg-type]
        elif kind == "event":
            _scenario_event(payload, now)
        elif kind in ("tick", "react"):
            for pool in pools:  # Karpenter keeps reporting while pods stay Unschedulable
                if pool.unschedulable:
                    fleet.retry_pending(pool, now)
            view = FleetView(now, fleet, log)
            actions = controller.step(view)
            apply(actions, now)
            timeline.append(Tick(
                now, last_mode[0], tuple(p.live for p in pools),
                tuple(len(p.ready) for p in pools), _weights_of(cum, npools),
                actions.reasons if keep_reasons else ()))
            following = now + controller.period_s
            if kind == "tick" and following < scenario.duration_s:
                schedule(following, "tick", None)

    def _scenario_event(event: object, now: float) -> None:
        if isinstance(event, PriceChange):
            fleet.set_price(pools[scenario.pool_index(event.pool)], event.price_per_hour, now)
        elif isinstance(event, CapacityShort):
            pool = pools[scenario.pool_index(event.pool)]
            victims = fleet.start_shortage(pool, now + event.duration_s,
                                           event.available_replicas, now)
            schedule(now + event.duration_s, "short_end", pool)
            if victims:
                lose(pool, victims, now)
        elif isinstance(event, Outage):
            pool = pools[scenario.pool_index(event.pool)]
            if event.duration_s > 0:
                fleet.start_shortage(pool, now + event.duration_s, None, now)
                schedule(now + event.duration_s, "short_end", pool)
            lose(pool, fleet.running_replicas(pool), now)
        elif isinstance(event, Interrupt):
            pool = pools[scenario.pool_index(event.pool)]
            running = fleet.running_replicas(pool)
            count = min(len(running), round(event.fraction * len(running)))
            picked = event_rng.choice(len(running), size=count, replace=False) if count else []
            lose(pool, [running[int(k)] for k in picked], now)

    def advance(until: float) -> None:
        while heap and heap[0][0] <= until:
            now, _, _, kind, payload = heapq.heappop(heap)
            handle(now, kind, payload)

    # ---- the per-request loop ------------------------------------------------------
    arrival_s = draws.arrival_s
    total = len(arrival_s)
    readies = [p.ready for p in pools] + [[]]  # last: "no pool" (all weights zero)
    service = [p.service_s for p in pools] + [1.0]
    latency = [p.spec.latency_s for p in pools] + [0.0]
    sigma = [math.sqrt(math.log1p(p.spec.service_cv ** 2)) for p in pools] + [0.0]
    half = [s * s / 2.0 for s in sigma]
    timeout = scenario.timeout_s
    lat_out, pool_out, rep_out = log.latency, log.pool, log.replica
    exp = math.exp
    next_t = heap[0][0] if heap else math.inf
    for base in range(0, total, _CHUNK):
        times = arrival_s[base: base + _CHUNK].tolist()
        us = draws.route_u[base: base + _CHUNK].tolist()
        vs = draws.pick_u[base: base + _CHUNK].tolist()
        zs = draws.service_z[base: base + _CHUNK].tolist()
        for k, t in enumerate(times):
            i = base + k
            if t >= next_t:
                log.count = i
                advance(t)
                next_t = heap[0][0] if heap else math.inf
            u = us[k]
            p = 0
            while u >= cum[p]:
                p += 1
            reps = readies[p]
            m = len(reps)
            if not m:
                lat_out[i] = -1.0
                pool_out[i] = p if p < npools else -1
                rep_out[i] = -1
                continue
            if m == 1:
                rep = reps[0]
            else:  # power of two choices: the less busy of two random ready replicas
                x = vs[k] * m
                j = int(x)
                j2 = int((x - j) * (m - 1))
                if j2 >= j:
                    j2 += 1
                rep = reps[j]
                other = reps[j2]
                if other.free < rep.free:
                    rep = other
            free = rep.free
            if free > t:
                if free - t > timeout:
                    lat_out[i] = -2.0
                    pool_out[i] = p
                    rep_out[i] = -1
                    continue
                begin = free
            else:
                begin = t
            mult = exp(sigma[p] * zs[k] - half[p])
            rep.free = begin + service[p] * mult
            lat_out[i] = begin - t + latency[p] * mult
            pool_out[i] = p
            rep_out[i] = rep.id
    log.count = total
    advance(scenario.duration_s)
    fleet.close(scenario.duration_s)
    return RunLog(
        policy=controller.name,
        scenario=scenario,
        log=log,
        pool_cost_usd={p.name: p.cost_usd for p in pools},
        replica_hours={p.name: p.replica_seconds / 3600.0 for p in pools},
        mode_switches=switches,
        timeline=timeline,
        wall_s=time.perf_counter() - started,
    )


def _cumulative(weights: Mapping[str, float], pools: list[SimPool]) -> list[float]:
    """Cumulative routing thresholds, plus a sentinel that catches everything left over."""
    values = [max(0.0, float(weights.get(p.name, 0.0))) for p in pools]
    total = sum(values)
    if total <= 0:
        return [0.0] * len(pools) + [2.0]
    out, running = [], 0.0
    for value in values:
        running += value
        out.append(1.0 if running >= total * (1 - 1e-12) else running / total)
    return out + [2.0]


def _weights_of(cum: list[float], npools: int) -> tuple[float, ...]:
    previous, out = 0.0, []
    for value in cum[:npools]:
        out.append(round(value - previous, 6))
        previous = value
    return tuple(out)
