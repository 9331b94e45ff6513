"""The simulated fleet: pools of replicas that start, serve, drain, get lost, and bill.

A replica's life follows Kubernetes and Karpenter: asked for, it is Pending until its pool
can get a node (during a capacity shortage it stays Pending as Unschedulable, and the pool
reports insufficient capacity); once placed it is billed and Starting for the pool's
provisioning delay (node launch, image pull, model load); then Ready and in the router's
rotation. Scaled down, it leaves the rotation at once but is billed until its queue
drains. Lost (outage, spot interruption), it stops at once, its queued and running requests
fail, and its Deployment asks for a replacement straight away.

Serving is the pipeline model stated in docs/simulator.md: a replica starts requests in
order, one per 1/throughput seconds (with `service_cv` variation) and each finishes its
latency later, so an idle replica answers in `latency_s` and a busy one serves exactly its
measured throughput. A replica therefore needs only one number — when it can start the next
request — and the engine updates it per request without a completion event.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .scenario import Pool, Scenario

PENDING, STARTING, READY, GONE = 0, 1, 2, 3

#: Scheduler callback the fleet uses for timed transitions: (time, kind, payload).
Schedule = Callable[[float, str, object], None]


class Replica:
    __slots__ = ("id", "pool", "state", "free", "ready_at")

    def __init__(self, rid: int, pool: int) -> None:
        self.id = rid
        self.pool = pool
        self.state = PENDING
        self.free = 0.0  # when it can start its next request
        self.ready_at = math.inf


class SimPool:
    """One pool's replicas, capacity state and bill."""

    def __init__(self, index: int, spec: Pool) -> None:
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.price = spec.price_per_hour
        self.service_s = 1.0 / spec.throughput_rps_per_replica
        self.unschedulable: list[Replica] = []
        self.starting: list[Replica] = []
        self.ready: list[Replica] = []
        self.billed = 0
        self.cost_usd = 0.0
        self.replica_seconds = 0.0
        self.last_bill_s = 0.0
        self.short_until = -math.inf
        self.short_cap: int | None = None
        #: When replicas first stayed Unschedulable in this stretch (None: none are).
        self.unschedulable_since: float | None = None
        #: Last time Karpenter reported insufficient capacity for this pool.
        self.last_ice_s = -math.inf

    @property
    def live(self) -> int:
        return len(self.unschedulable) + len(self.starting) + len(self.ready)

    @property
    def running(self) -> int:
        return len(self.starting) + len(self.ready)

    def is_short(self, now_s: float) -> bool:
        return now_s < self.short_until

    def queue_depth(self, now_s: float) -> float:
        """Requests waiting in the pool's ready replicas (not counting the one in service)."""
        wait = sum(r.free - now_s for r in self.ready if r.free > now_s)
        return wait / self.service_s


class Fleet:
    """All pools; every change of a pool's billed count goes through here."""

    def __init__(self, scenario: Scenario, schedule: Schedule) -> None:
        self.pools = [SimPool(i, p) for i, p in enumerate(scenario.pools)]
        self._schedule = schedule
        self._next_id = 0

    # -- billing ---------------------------------------------------------------
    def bill(self, pool: SimPool, now_s: float) -> None:
        elapsed = now_s - pool.last_bill_s
        if elapsed > 0:
            pool.cost_usd += pool.price * pool.billed * elapsed / 3600.0
            pool.replica_seconds += pool.billed * elapsed
        pool.last_bill_s = now_s

    def set_price(self, pool: SimPool, price: float, now_s: float) -> None:
        self.bill(pool, now_s)
        pool.price = price

    def close(self, now_s: float) -> None:
        for pool in self.pools:
            self.bill(pool, now_s)

    # -- lifecycle -------------------------------------------------------------
    def warm_start(self, pool: SimPool, count: int) -> None:
        """Replicas already serving when the run starts (billed from t=0)."""
        for _ in range(count):
            replica = self._new(pool)
            replica.state = READY
            replica.ready_at = 0.0
            pool.ready.append(replica)
            pool.billed += 1

    def scale_to(self, pool: SimPool, desired: int, now_s: float) -> None:
        desired = max(0, min(desired, pool.spec.max_replicas))
        live = pool.live
        if desired > live:
            for _ in range(desired - live):
                self._ask(pool, self._new(pool), now_s)
        elif desired < live:
            self._remove(pool, live - desired, now_s)

    def on_ready(self, replica: Replica, now_s: float) -> None:
        if replica.state != STARTING:
            return  # scaled down or lost while starting
        pool = self.pools[replica.pool]
        pool.starting.remove(replica)
        replica.state = READY
        replica.free = now_s
        pool.ready.append(replica)

    def on_release(self, pool: SimPool, now_s: float) -> None:
        """A drained replica's node goes away: billing stops."""
        self.bill(pool, now_s)
        pool.billed -= 1

    def lose(self, pool: SimPool, victims: list[Replica], now_s: float) -> list[int]:
        """Replicas die now; returns the ids of those that were serving (their requests
        fail). Each one's Deployment asks for a replacement at once."""
        self.bill(pool, now_s)
        serving: list[int] = []
        lost = 0
        for replica in victims:
            if replica.state == READY:
                pool.ready.remove(replica)
                serving.append(replica.id)
            elif replica.state == STARTING:
                pool.starting.remove(replica)
            else:
                continue
            replica.state = GONE
            pool.billed -= 1
            lost += 1
        for _ in range(lost):
            self._ask(pool, self._new(pool), now_s)
        return serving

    def running_replicas(self, pool: SimPool) -> list[Replica]:
        return pool.ready + pool.starting

    def start_shortage(self, pool: SimPool, until_s: float, cap: int | None,
                       now_s: float) -> list[Replica]:
        """Mark the pool short; return the replicas a capacity cap reclaims (to `lose`)."""
        pool.short_until = max(pool.short_until, until_s)
        pool.short_cap = cap
        if cap is None or pool.running <= cap:
            return []
        excess = pool.running - cap
        # Reclaim starting nodes first, then the ready replicas with the shortest queues.
        victims = sorted(pool.starting, key=lambda r: -r.ready_at)[:excess]
        if len(victims) < excess:
            victims += sorted(pool.ready, key=lambda r: r.free)[: excess - len(victims)]
        return victims

    def end_shortage(self, pool: SimPool, now_s: float) -> None:
        if pool.is_short(now_s):
            return  # a later, longer shortage still holds
        pool.short_cap = None
        self.retry_pending(pool, now_s)

    def retry_pending(self, pool: SimPool, now_s: float) -> None:
        """Karpenter's retry: place whatever Pending replicas the pool can now hold."""
        waiting, pool.unschedulable = pool.unschedulable, []
        since = pool.unschedulable_since
        for replica in waiting:
            self._ask(pool, replica, now_s)
        if pool.unschedulable:
            pool.last_ice_s = now_s
            pool.unschedulable_since = since if since is not None else now_s

    # -- internals -------------------------------------------------------------
    def _new(self, pool: SimPool) -> Replica:
        replica = Replica(self._next_id, pool.index)
        self._next_id += 1
        return replica

    def _can_place(self, pool: SimPool, now_s: float) -> bool:
        if not pool.is_short(now_s):
            return True
        return pool.short_cap is not None and pool.running < pool.short_cap

    def _ask(self, pool: SimPool, replica: Replica, now_s: float) -> None:
        if self._can_place(pool, now_s):
            self.bill(pool, now_s)
            pool.billed += 1
            replica.state = STARTING
            replica.ready_at = now_s + pool.spec.provision_s
            pool.starting.append(replica)
            self._schedule(replica.ready_at, "ready", replica)
        else:
            replica.state = PENDING
            pool.unschedulable.append(replica)
            pool.last_ice_s = now_s
        self._refresh_since(pool, now_s)

    @staticmethod
    def _refresh_since(pool: SimPool, now_s: float) -> None:
        if not pool.unschedulable:
            pool.unschedulable_since = None
        elif pool.unschedulable_since is None:
            pool.unschedulable_since = now_s

    def _remove(self, pool: SimPool, count: int, now_s: float) -> None:
        # Cheapest to give up first: Pending pods, then nodes still starting (newest
        # first), then ready replicas with the least queued work.
        while count and pool.unschedulable:
            pool.unschedulable.pop().state = GONE
            count -= 1
        self._refresh_since(pool, now_s)
        if count and pool.starting:
            self.bill(pool, now_s)
            for replica in sorted(pool.starting, key=lambda r: -r.ready_at)[:count]:
                pool.starting.remove(replica)
                replica.state = GONE
                pool.billed -= 1
                count -= 1
        if count and pool.ready:
            for replica in sorted(pool.ready, key=lambda r: r.free)[:count]:
                pool.ready.remove(replica)
                replica.state = GONE
                drained = max(now_s, replica.free + pool.spec.latency_s * (1 + 3 * pool.spec.service_cv))
                self._schedule(drained, "release", pool)
