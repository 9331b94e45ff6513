"""Discrete-event simulation of one router in front of heterogeneous workers (for `bench router`).

The router side is the real thing: `Balancer`, `EndpointLoad` and `costing` from
stepfleet.serving.router, fed exactly what the live router gets (its own in-flight work,
the worker's backlog report on each response, the latency of each completed request), with
no knowledge of the workers' true speeds: every worker starts at the same default guess.

The worker side models step-level batching: up to `max_batch` requests run together and
share the worker's steps; a batch of k runs `k / (1 + BATCH_PENALTY (k - 1))` times as fast
as one request alone (sub-linear, as measured on the tiny UNet in TOOLING.md), so each of
the k requests progresses at `speed × eff(k) / k`. More requests wait FIFO. A request's true
cost is the router's predicted cost times log-normal noise (predictions are never exact).
Edits on a worker holding their template (it served that template recently, LRU of
`TEMPLATE_SLOTS`) cost the cached share; elsewhere they cost the full image.

Pure and deterministic for a seed; no clock, no I/O.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from stepfleet.serving.router import costing
from stepfleet.serving.router.balancing import Attempts, Balancer, EndpointLoad, PoolView

BATCH_PENALTY = 0.25
TEMPLATE_SLOTS = 8


def batch_efficiency(k: int) -> float:
    return k / (1 + BATCH_PENALTY * (k - 1)) if k > 0 else 0.0


@dataclass
class SimRequest:
    arrival: float
    cost: costing.RequestCost
    noise: float
    mask_ratio: float | None = None
    finished: float | None = None
    remaining: float = 0.0
    units_charged: float = 0.0
    ahead: float = 0.0


@dataclass
class SimWorker:
    load: EndpointLoad
    speed: float  # units per second for one request alone
    max_batch: int
    running: list[SimRequest] = field(default_factory=list)
    queue: deque = field(default_factory=deque)
    templates: OrderedDict = field(default_factory=OrderedDict)

    def per_request_rate(self) -> float:
        k = len(self.running)
        return self.speed * batch_efficiency(k) / k if k else 0.0

    def backlog_s(self) -> float:
        """What the worker would report: outstanding work at full-batch throughput."""
        work = sum(r.remaining for r in self.running) + sum(r.remaining for r in self.queue)
        return work / (self.speed * batch_efficiency(self.max_batch))

    def true_cost(self, req: SimRequest) -> float:
        c = req.cost
        if c.kind == "edit" and c.template_id:
            hit = c.template_id in self.templates
            self.templates[c.template_id] = True
            self.templates.move_to_end(c.template_id)
            while len(self.templates) > TEMPLATE_SLOTS:
                self.templates.popitem(last=False)
            return (c.units if hit else c.uncached_units) * req.noise
        return c.units * req.noise

    def admit(self, req: SimRequest) -> None:
        req.remaining = self.true_cost(req)
        if len(self.running) < self.max_batch:
            self.running.append(req)
        else:
            self.queue.append(req)


def make_trace(n: int, rate_rps: float, seed: int, edit_share: float = 0.3, templates: int = 24) -> list[SimRequest]:
    """Poisson arrivals; costs mixed tenfold (steps, size, n) and a share of template edits."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        steps = rng.choice((10, 20, 30, 50))
        side = rng.choice((256, 512, 768))
        n_img = rng.choice((1, 1, 1, 2))
        noise = math.exp(rng.gauss(0.0, 0.1))
        if rng.random() < edit_share:
            tpl = f"tpl-{min(templates - 1, int(rng.paretovariate(1.2)) - 1)}"
            ratio = rng.uniform(0.05, 0.6)
            fields = {"size": f"{side}x{side}", "num_inference_steps": str(steps), "n": str(n_img),
                      "template_id": tpl}
            cost = costing.edit_cost(fields, ratio, 20, 512)
            out.append(SimRequest(t, cost, noise, ratio))
        else:
            body = {"size": f"{side}x{side}", "num_inference_steps": steps, "n": n_img}
            out.append(SimRequest(t, costing.generation_cost(body, 20, 512), noise))
    return out


def capacity_units_per_s(speeds: list[float], max_batch: int) -> float:
    return sum(s * batch_efficiency(max_batch) for s in speeds)


def simulate(policy: str, trace: list[SimRequest], speeds: list[float], max_batch: int = 4) -> list[float]:
    """Latencies (seconds) of every request of `trace` under `policy`; the trace is not modified."""
    reqs = [SimRequest(r.arrival, r.cost, r.noise, r.mask_ratio) for r in trace]
    workers = [SimWorker(EndpointLoad(f"http://w{i}", "p"), s, max_batch) for i, s in enumerate(speeds)]
    by_url = {w.load.url: w for w in workers}
    pool = [PoolView("p", 1.0, [w.load for w in workers])]
    balancer = Balancer(policy, max_inflight=10_000)  # type: ignore[arg-type]
    t = 0.0
    i = 0
    done = 0
    while done < len(reqs):
        next_arrival = reqs[i].arrival if i < len(reqs) else math.inf
        next_done, who = math.inf, None
        for w in workers:
            if w.running:
                rate = w.per_request_rate()
                r = min(w.running, key=lambda x: x.remaining)
                when = t + r.remaining / rate
                if when < next_done:
                    next_done, who = when, w
        t_next = min(next_arrival, next_done)
        for w in workers:
            if w.running:
                step = (t_next - t) * w.per_request_rate()
                for r in w.running:
                    r.remaining -= step
        t = t_next
        if who is not None and next_done <= next_arrival:
            r = min(who.running, key=lambda x: x.remaining)
            who.running.remove(r)
            if who.queue:
                who.running.append(who.queue.popleft())
            r.finished = t
            done += 1
            ep = who.load
            ep.finished(r.units_charged)
            ep.report(who.backlog_s(), t)  # X-Stepfleet-Backlog-Seconds on the response
            ep.learn(r.ahead, r.units_charged, t - r.arrival)
        else:
            r = reqs[i]
            i += 1
            target = balancer.next_target(pool, r.cost, t, Attempts())
            assert target is not None
            r.units_charged = target.units
            r.ahead = target.endpoint.dispatched(target.units)
            by_url[target.endpoint.url].admit(r)
    return [r.finished - r.arrival for r in reqs]  # type: ignore[operator]


def stats(latencies: list[float]) -> dict[str, float]:
    xs = sorted(latencies)
    p95 = xs[min(len(xs) - 1, int(math.ceil(0.95 * len(xs))) - 1)]
    return {"mean_s": round(sum(xs) / len(xs), 4), "p95_s": round(p95, 4), "requests": len(xs)}


def compare(n: int = 4000, load: float = 0.5, seed: int = 11, speeds: tuple[float, ...] = (60.0, 60.0, 30.0, 30.0),
            max_batch: int = 4) -> dict:
    """The three within-pool policies on one trace; warm-up requests (first 5 %) are dropped."""
    probe = make_trace(2000, 1.0, seed)
    mean_units = sum(r.cost.units * r.noise for r in probe) / len(probe)
    rate = load * capacity_units_per_s(list(speeds), max_batch) / mean_units
    trace = make_trace(n, rate, seed)
    out: dict = {}
    skip = n // 20
    for policy in ("predicted", "round_robin", "least_requests"):
        out[policy] = stats(simulate(policy, trace, list(speeds), max_batch)[skip:])
    out["setup"] = {"requests": n, "load": load, "arrival_rps": round(rate, 3), "worker_speeds_units_per_s": list(speeds),
                    "max_batch": max_batch, "seed": seed}
    return out
