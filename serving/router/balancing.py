"""Where a request goes: pure decisions over the router's view of the fleet.

Two levels, as the control loop intends. **Across pools** the operator's weights decide,
through smooth weighted round-robin (nginx's algorithm): over any window the split matches
the weights closely and the picks interleave instead of bursting. **Within a pool** workers
are alike in price but not in load, so a request goes where it is *predicted to finish
first*: the worker's outstanding work divided by its learned speed, plus the request's own
cost (`costing`) over that speed. Request-count balancing ("least requests") is blind to a
10× difference in cost between requests and to slow workers; this is not.

Edits prefer the worker that holds their template's activations, found by rendezvous
hashing on `template_id` (adding or losing a worker moves only its share of templates).
That worker is charged the cached cost and every other the full cost, so the preference
yields exactly when the cached worker is backed up by more than the cache saves.

No I/O and no clock reads: callers pass `now` (monotonic seconds). The benchmark's
simulator and the router run this same code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from stepfleet.serving.router.costing import RequestCost

Policy = Literal["predicted", "least_requests", "round_robin"]
POLICIES: tuple[str, ...] = ("predicted", "least_requests", "round_robin")

#: Initial speed guess (cost units per second) before a worker has answered anything. Only
#: relative values matter between workers, and learning replaces it within a few requests.
DEFAULT_RATE = 20.0
#: Weight of one observation in the speed estimate: follows a change within ~10 requests.
RATE_ALPHA = 0.2
#: One observation may move the estimate by at most this factor (a GC pause is not a new GPU).
RATE_STEP_LIMIT = 4.0
#: Predicted completion times this close to the best count as a tie (relative, absolute).
TIE_TOLERANCE = 0.05
TIE_SLACK_S = 0.002


@dataclass
class EndpointLoad:
    """The router's knowledge of one worker. Mutated by the router, read by the policies."""

    url: str
    pool: str
    #: Requests this router has in flight on the worker, and their predicted cost.
    inflight: int = 0
    inflight_units: float = 0.0
    #: The worker's own estimate of its outstanding work (X-Stepfleet-Backlog-Seconds or /v1/load).
    reported_backlog_s: float = 0.0
    reported_at: float = 0.0
    #: Learned speed in cost units per second.
    rate: float = DEFAULT_RATE
    ready: bool = True
    #: Skipped until then: refused connections (down) and 429s (saturated).
    down_until: float = 0.0
    saturated_until: float = 0.0
    #: Round-robin position (used only by the round-robin baseline).
    served: int = 0
    #: Completed requests the speed estimate has learned from.
    samples: int = 0
    #: Load polls in a row that got no answer in time, and whether that made it unresponsive:
    #: a hung worker (stopped, deadlocked) accepts connections and never answers, so only
    #: silence tells it apart; it is skipped until it answers again (`serving.router.health`).
    silent_polls: int = 0
    unresponsive: bool = False

    def wait_s(self, now: float) -> float:
        """Seconds of work ahead of a new request.

        The worker's report covers every router's traffic but ages between reports; this
        router's own in-flight work is exact but misses other routers. The larger of the two
        is right in both the one-router and the many-router case.
        """
        reported = max(0.0, self.reported_backlog_s - max(0.0, now - self.reported_at))
        return max(reported, self.inflight_units / self.rate)

    def predicted_s(self, units: float, now: float) -> float:
        return self.wait_s(now) + units / self.rate

    def usable(self, now: float, max_inflight: int) -> bool:
        return self.available(now) and not self.saturated(now, max_inflight)

    def available(self, now: float) -> bool:
        """Ready, answering and not ejected: usable unless saturated."""
        return self.ready and not self.unresponsive and now >= self.down_until

    def saturated(self, now: float, max_inflight: int) -> bool:
        return now < self.saturated_until or self.inflight >= max_inflight

    # -- updates (the router calls these around each attempt) ---------------------------------
    def dispatched(self, units: float) -> float:
        """Count a request in; return the in-flight work it found (for learning the speed)."""
        ahead = self.inflight_units
        self.inflight += 1
        self.inflight_units += units
        self.served += 1
        return ahead

    def finished(self, units: float) -> None:
        self.inflight = max(0, self.inflight - 1)
        self.inflight_units = max(0.0, self.inflight_units - units) if self.inflight else 0.0

    def no_answer(self, limit: int) -> bool:
        """A load poll got no answer in time; True when this one makes the worker unresponsive."""
        self.silent_polls += 1
        if self.unresponsive or self.silent_polls < limit:
            return False
        self.unresponsive = True
        return True

    def answered(self) -> bool:
        """The worker answered something; True when that brings it back from unresponsive."""
        back = self.unresponsive
        self.silent_polls = 0
        self.unresponsive = False
        return back

    def report(self, backlog_s: float, now: float) -> None:
        self.reported_backlog_s = max(0.0, backlog_s)
        self.reported_at = now

    def learn(self, units_ahead: float, units: float, latency_s: float) -> None:
        """Update the speed from one completed request.

        Under step-level batching the worker shares its steps among everything in flight, so
        a request that found `units_ahead` of work and brought `units` finishes after roughly
        `(units_ahead + units) / rate` seconds; solve that for the rate and smooth it.
        """
        if latency_s <= 0 or units <= 0:
            return
        observed = (units_ahead + units) / latency_s
        observed = min(self.rate * RATE_STEP_LIMIT, max(self.rate / RATE_STEP_LIMIT, observed))
        self.rate = (1 - RATE_ALPHA) * self.rate + RATE_ALPHA * observed
        self.samples += 1


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round-robin over named choices with float weights.

    Each pick adds every candidate's weight to its running score, takes the highest, and
    subtracts the total from the winner. Over W picks each name is chosen in proportion to
    its weight (exact for integer weights), and the picks interleave. Names not offered in a
    pick keep their score; names gone from the config are forgotten with `retain`.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def pick(self, weights: Mapping[str, float]) -> str | None:
        live = {name: w for name, w in weights.items() if w > 0}
        if not live:
            return None
        total = sum(live.values())
        best: str | None = None
        for name, w in live.items():
            score = self.current.get(name, 0.0) + w
            self.current[name] = score
            if best is None or score > self.current[best]:
                best = name
        assert best is not None
        self.current[best] -= total
        return best

    def retain(self, names: Iterable[str]) -> None:
        keep = set(names)
        self.current = {k: v for k, v in self.current.items() if k in keep}


def effective_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights as routed: as configured, or equal when every pool has weight 0.

    The operator writes all zeros only when it knows of no capacity anywhere; failing open
    (equal shares over whatever workers exist) beats refusing every request.
    """
    if any(w > 0 for w in weights.values()):
        return {k: float(w) for k, w in weights.items()}
    return {k: 1.0 for k in weights}


def rendezvous_rank(key: str, urls: Iterable[str]) -> list[str]:
    """Highest-random-weight order of `urls` for `key` (stable, process-independent)."""

    def score(url: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")

    return sorted(urls, key=score, reverse=True)


def choose_endpoint(
    endpoints: Sequence[EndpointLoad],
    cost: RequestCost,
    now: float,
    policy: Policy = "predicted",
    exclude: frozenset[str] | set[str] = frozenset(),
    max_inflight: int = 128,
) -> tuple[EndpointLoad, float] | None:
    """The worker of one pool that should take `cost` and the cost it will pay there; None if none is usable."""
    usable = [e for e in endpoints if e.url not in exclude and e.usable(now, max_inflight)]
    if not usable:
        return None
    home = None
    key = cost.template_id or cost.affinity
    if key:
        # The template's home is where it is known to be (`cost.home`, when that worker is
        # usable), else the top-ranked usable worker: when the home is down or saturated, the
        # next in rank takes over (and will hold the cache from then on).
        urls = [e.url for e in usable]
        home = cost.home if cost.home in urls else rendezvous_rank(key, urls)[0]

    def units_on(e: EndpointLoad) -> float:
        return cost.units if home is None or e.url == home else cost.uncached_units

    if policy == "round_robin":
        best = min(usable, key=lambda e: (e.served, e.url))
    elif policy == "least_requests":
        best = min(usable, key=lambda e: (e.inflight, e.served, e.url))
    else:
        _adopt_peer_speed(endpoints)
        predicted = {e.url: e.predicted_s(units_on(e), now) for e in usable}
        # Predictions are estimates: among workers within the tolerance of the best, take the
        # template's home (keeps its cache warm), else the least used, so an idle pool spreads
        # work (and every worker's speed gets measured).
        cutoff = min(predicted.values()) * (1 + TIE_TOLERANCE) + TIE_SLACK_S
        best = min((e for e in usable if predicted[e.url] <= cutoff),
                   key=lambda e: (e.url != home, e.inflight, e.served, predicted[e.url], e.url))
    return best, units_on(best)


def _adopt_peer_speed(endpoints: Sequence[EndpointLoad]) -> None:
    """A worker never measured yet takes its pool's mean measured speed (same hardware).

    Without this, one fast answer makes the measured worker look infinitely better than the
    default guess of its idle twin, which then never gets traffic and never gets measured.
    """
    measured = [e.rate for e in endpoints if e.samples]
    if measured and len(measured) < len(endpoints):
        prior = sum(measured) / len(measured)
        for e in endpoints:
            if not e.samples:
                e.rate = prior


@dataclass
class PoolView:
    """A pool as balancing sees it: its weight and its workers."""

    name: str
    weight: float
    endpoints: list[EndpointLoad] = field(default_factory=list)

    def has_usable(self, now: float, max_inflight: int, exclude: frozenset[str] | set[str] = frozenset()) -> bool:
        return any(e.url not in exclude and e.usable(now, max_inflight) for e in self.endpoints)


@dataclass
class Attempts:
    """What one request has tried so far (the failover walk's memory)."""

    tried_urls: set[str] = field(default_factory=set)
    tried_pools: list[str] = field(default_factory=list)
    failures: int = 0


@dataclass(frozen=True)
class Target:
    pool: str
    endpoint: EndpointLoad
    #: The request's predicted cost on this worker (cached or not).
    units: float


class Balancer:
    """Pool choice by weight, worker choice by policy, and the failover walk between them.

    Failover order, as the issue asks: after a failure, once more on another worker of the
    same pool, then on other pools (highest weight first). A worker that answered 429 is
    skipped without spending a failure. Pools with weight 0 are never chosen, not even for
    failover: the control loop set them to zero for a reason (scaled to zero, draining).
    """

    def __init__(self, policy: Policy = "predicted", max_inflight: int = 128) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        self.policy: Policy = policy
        self.max_inflight = max_inflight
        self.wrr = SmoothWeightedRoundRobin()

    def next_target(
        self, pools: Sequence[PoolView], cost: RequestCost, now: float, attempts: Attempts
    ) -> Target | None:
        weights = effective_weights({p.name: p.weight for p in pools})
        by_name = {p.name: p for p in pools if weights.get(p.name, 0) > 0}
        if not attempts.tried_pools:
            offered = {n: weights[n] for n, p in by_name.items()
                       if p.has_usable(now, self.max_inflight, attempts.tried_urls)}
            name = self.wrr.pick(offered)
            return self._in_pool(by_name[name], cost, now, attempts) if name else None
        # Retry: the same pool once more after a first failure, then the other pools.
        last = attempts.tried_pools[-1]
        order: list[str] = []
        if last in by_name and (attempts.failures <= 1 or attempts.tried_pools.count(last) < 2):
            order.append(last)
        others = sorted((n for n in by_name if n not in attempts.tried_pools and n != last),
                        key=lambda n: (-weights[n], n))
        order += others + [n for n in attempts.tried_pools if n in by_name and n not in order]
        for name in dict.fromkeys(order):
            target = self._in_pool(by_name[name], cost, now, attempts)
            if target is not None:
                return target
        return None

    def _in_pool(self, pool: PoolView, cost: RequestCost, now: float, attempts: Attempts) -> Target | None:
        choice = choose_endpoint(pool.endpoints, cost, now, self.policy, attempts.tried_urls, self.max_inflight)
        if choice is None:
            return None
        ep, units = choice
        attempts.tried_urls.add(ep.url)
        attempts.tried_pools.append(pool.name)
        return Target(pool.name, ep, units)

    def retain(self, names: Iterable[str]) -> None:
        self.wrr.retain(names)


def saturation_retry_after(pools: Sequence[PoolView], now: float, max_inflight: int) -> float | None:
    """If every known worker of a weighted pool is saturated, how long until one frees up."""
    weights = effective_weights({p.name: p.weight for p in pools})
    eps = [e for p in pools if weights.get(p.name, 0) > 0 for e in p.endpoints if e.available(now)]
    if not eps or not all(e.saturated(now, max_inflight) for e in eps):
        return None
    waits = [e.saturated_until - now for e in eps if e.saturated_until > now]
    return max(1.0, min(waits)) if waits else 1.0
