"""The data the control loop's policy takes in and gives back.

`decide(observation, state, spec) -> (plan, state)` is a pure function, so everything it
needs travels in these frozen dataclasses and nothing else: the spec says what the user
asked for (SLO, pools, limits, loop settings), the observation says what the fleet looks
like now, the state carries the little the policy must remember between calls (its mode,
which pools it saw short, its recent recommendations), and the plan says what to do and why.

The kopf timer, the local fleet runner and the simulator each build these from their own
world (Prometheus and Kubernetes objects, local processes, simulated replicas); none of
that leaks in here. Units are in the field names: ``_s`` seconds, ``_rps`` requests per
second, ``_per_hour`` US dollars per hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["cost", "capacity"]
ModeSetting = Literal["auto", "cost", "capacity"]
CapacityType = Literal["on-demand", "spot", "reserved"]


@dataclass(frozen=True)
class SloSpec:
    """The latency objective: `percentile` of requests finish within `latency_s`."""

    latency_s: float
    percentile: float = 0.95


@dataclass(frozen=True)
class PoolSpec:
    """One worker pool (one accelerator type) as the user declared it.

    `throughput_rps_per_replica` and `latency_s` are the pool's measured figures (the
    paper's breaking-point throughput and its latency there); an observation may carry
    fresher measurements, which then win. `service_cv` is how much one request's service
    time varies (coefficient of variation); it only feeds the queueing estimate.

    `failure_domain` names what the pool's replicas fail with (a capacity type, zone and
    instance family: `spot/us-east-1a/inf2`); pools that share it are lost together. Empty:
    the pool is a domain of its own. `capacity_type` says whether it is spot (interrupted
    at the provider's will, so hedged by default) or on-demand/reserved.
    """

    name: str
    price_per_hour: float
    throughput_rps_per_replica: float
    latency_s: float
    provision_s: float = 600.0
    min_replicas: int = 0
    max_replicas: int = 100
    service_cv: float = 0.1
    failure_domain: str = ""
    capacity_type: CapacityType = "on-demand"
    #: Video jobs per second one replica sustains (None: `throughput_rps_per_replica` /
    #: `kinds.DEFAULT_VIDEO_COST_IMAGES`). A video job costs one to two orders of magnitude
    #: more device time than an image, so counting it as one request under-provisions.
    video_throughput_rps_per_replica: float | None = None

    @property
    def domain(self) -> str:
        """The failure domain this pool is lost with (its own name when none is given)."""
        return self.failure_domain or self.name


@dataclass(frozen=True)
class ControlSettings:
    """How the loop trades cost against safety; every field says its unit and why.

    Defaults suit pools whose replicas take minutes to load a model: the loop plans one
    provisioning delay ahead, stays in capacity mode long enough that a model load started
    there is not wasted, and scales down only after demand has stayed low for a while.
    """

    #: Seconds between two decisions; the forecast looks this far past the provisioning delay.
    interval_s: float = 60.0
    #: Least seconds in capacity mode before going back (model loads take minutes).
    dwell_s: float = 1800.0
    #: Seconds a short pool must keep showing capacity before the loop trusts it again.
    recovery_window_s: float = 600.0
    #: Scale-down waits until lower recommendations have held this many seconds.
    stabilization_s: float = 300.0
    #: Then ready replicas go at once down to this spare fraction above the planned demand;
    #: the spare itself leaves at most `scale_down_per_min` of a pool's ready replicas per
    #: minute: ready replicas took minutes to load, and a scale-down that misjudged a ramp
    #: costs a provisioning delay of SLO misses.
    scale_down_buffer: float = 0.25
    scale_down_per_min: float = 0.1
    #: Spare fraction above the forecast demand in cost mode (covers estimate noise).
    headroom: float = 0.03
    #: Spare fraction in capacity mode: more, since another pool may run short as well.
    capacity_headroom: float = 0.15
    #: Never plan a replica busier than this, whatever the queueing estimate allows.
    max_utilization: float = 0.97
    #: Share of the SLO's miss budget (1 - percentile) that steady-state queueing may use;
    #: the rest is left for transients (provisioning lag, interruptions).
    tail_budget: float = 0.2
    #: Extra replicas a NodePool may hold above the plan, as a fraction (rolling surge).
    nodepool_surge: float = 0.1
    #: Most of the planned demand one pool may carry in cost mode (1: no limit). Below 1 it
    #: buys resilience to losing a whole pool (outage, spot interruption) at a price.
    max_pool_share: float = 1.0
    #: A pool already serving keeps its place in the cost order unless another is at least
    #: this much cheaper per image: moving load pays a provisioning delay of idle replicas.
    switch_margin: float = 0.05
    #: Hedging: the share of the planned demand that ready capacity *outside* a failure
    #: domain must serve, so that losing the domain holds the SLO until its replacement is
    #: provisioned. Spot domains are hedged by default (the provider interrupts them at will,
    #: SkyServe's SpotHedge); 1 would make a lone spot pool redundant, so half: the on-demand
    #: fallback carries half the demand while spot replacements load. On-demand domains are
    #: not hedged until they have lost ready capacity (a full hedge doubles the fleet's cost:
    #: docs/simulator.md measures it); after a loss, for `loss_memory_s`, they are.
    hedge_spot: float = 0.5
    hedge_on_demand: float = 0.0
    hedge_after_loss: float = 1.0
    #: Seconds a domain that lost ready capacity stays hedged: a day, so a domain that
    #: failed this morning is not trusted with all the traffic again this afternoon.
    loss_memory_s: float = 86400.0
    #: A pool whose ready replicas fall this fraction below what was ready and planned at
    #: the last decision has lost capacity (outage, mass interruption, pods stuck not-ready):
    #: a capacity signal, whatever the cause, acted on in the same decision.
    loss_fraction: float = 0.25
    #: Weight of a new provisioning measurement in a pool's learned provisioning time.
    provision_learning: float = 0.3


@dataclass(frozen=True)
class PolicySpec:
    """What the user asked for: the DiffusionService spec as far as the policy cares."""

    slo: SloSpec
    pools: tuple[PoolSpec, ...]
    mode: ModeSetting = "auto"
    control: ControlSettings = field(default_factory=ControlSettings)

    def pool(self, name: str) -> PoolSpec:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


@dataclass(frozen=True)
class PoolObservation:
    """One pool as observed now.

    `pending_replicas` counts replicas asked for but not ready (starting or unschedulable).
    `capacity_short_since` is set while the pool cannot get capacity (Karpenter
    InsufficientCapacityError, pods Unschedulable past a grace period): the time the
    shortage was first seen. `latency_s` is the measured SLO-percentile latency over the
    last interval (queueing included), `queue_depth` the requests waiting in the pool.
    Measured throughput and price override the spec when given.
    """

    name: str
    desired_replicas: int = 0
    ready_replicas: int = 0
    pending_replicas: int = 0
    price_per_hour: float | None = None
    throughput_rps_per_replica: float | None = None
    latency_s: float | None = None
    queue_depth: float = 0.0
    capacity_short_since: float | None = None
    #: Measured video jobs per second per replica (wins over the spec's, like the image figure).
    video_throughput_rps_per_replica: float | None = None


@dataclass(frozen=True)
class Observation:
    """The fleet now: the time (the policy reads no clock), demand and every pool."""

    now_s: float
    arrival_rps: float
    arrival_trend_rps_per_s: float = 0.0
    pools: tuple[PoolObservation, ...] = ()
    #: Fraction of `arrival_rps` that are video jobs (0: images only, planned as before).
    video_share: float = 0.0

    def pool(self, name: str) -> PoolObservation | None:
        for pool in self.pools:
            if pool.name == name:
                return pool
        return None


@dataclass(frozen=True)
class PoolMemory:
    """What the policy remembers about one pool between decisions."""

    name: str
    #: When the pool was first seen short in the current episode (None: not short).
    short_since: float | None = None
    #: When a pool we saw short started showing capacity again (None: not yet).
    recovered_since: float | None = None
    #: (time, replicas) recommendations inside the stabilization window, oldest first.
    recommendations: tuple[tuple[float, int], ...] = ()
    #: Replicas the last plan asked for.
    desired: int | None = None
    #: Ready replicas at the last decision (what a sudden loss is measured against).
    ready: int | None = None
    #: Since when the pool has lost ready capacity (None: it has not, or it came back), and
    #: how many ready replicas it is expected to regain.
    lost_since: float | None = None
    lost_expected: int = 0
    #: Last time the pool lost ready capacity (drives the hedge memory).
    last_loss_s: float | None = None
    #: Learned seconds from asking for replicas to their being ready (None: not measured).
    provision_s: float | None = None
    #: When the oldest replicas still not ready were asked for, and how many were wanted.
    asked_since: float | None = None
    asked_target: int = 0
    #: Share of traffic the last plan gave the pool.
    weight: float = 0.0


@dataclass(frozen=True)
class PolicyState:
    """Everything `decide` carries from one call to the next; start with `PolicyState()`."""

    mode: Mode = "cost"
    mode_since_s: float | None = None
    pools: tuple[PoolMemory, ...] = ()

    def memory(self, name: str) -> PoolMemory:
        for pool in self.pools:
            if pool.name == name:
                return pool
        return PoolMemory(name=name)


@dataclass(frozen=True)
class PoolPlan:
    """What one pool should look like: replicas, share of traffic, NodePool ceiling."""

    name: str
    replicas: int
    weight: float
    nodepool_limit: int
    cost_per_hour: float


@dataclass(frozen=True)
class Plan:
    """The decision, with the reasons a human reads in `status` and Events."""

    mode: Mode
    pools: tuple[PoolPlan, ...]
    reasons: tuple[str, ...]
    mode_changed: bool = False
    planned_rps: float = 0.0
    #: Pools the policy holds short of capacity (signals and losses): pool -> since when.
    short: tuple[tuple[str, float], ...] = ()
    #: Pools that lost ready capacity in this decision (a new loss, for an Event).
    newly_lost: tuple[str, ...] = ()

    @property
    def replicas(self) -> dict[str, int]:
        return {p.name: p.replicas for p in self.pools}

    @property
    def weights(self) -> dict[str, float]:
        return {p.name: p.weight for p in self.pools}

    @property
    def nodepool_limits(self) -> dict[str, int]:
        return {p.name: p.nodepool_limit for p in self.pools}

    @property
    def cost_per_hour(self) -> float:
        return sum(p.cost_per_hour for p in self.pools)
