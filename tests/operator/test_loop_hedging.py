"""Hedging and losses of ready capacity, wired into the operator (kopf against the emulator).

A pool whose ready pods vanish — no Karpenter Event, no Pending pod, nothing but the ready
count falling — must turn the DiffusionService to capacity mode with `CapacityShort` and a
Warning Event within one control interval; and a spot pool is hedged by default, which the
status says in the plan's reasons.
"""

from __future__ import annotations

import time

import pytest
from emulator import eventually
from operator_harness import DFS, NS, condition, emulator, operator
from test_loop_wiring import (
    LOOP,
    _events,
    _fleet,
    _ready,
    _replicas,
    _started,
    _status,
    _weights,
    _workers,
)

pytestmark = pytest.mark.timeout(60)

INTERVAL_S = 2.0


async def test_ready_pods_that_vanish_turn_on_capacity_mode_within_one_interval():
    async with emulator() as em, operator(em, LOOP):
        await _started(em, _fleet(intervalSeconds=INTERVAL_S))
        async with _workers(em, {"ondemand": 3.0}):
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=20)
            n = _replicas(em, "spot")
            await _ready(em, "spot", n)
            await eventually(lambda: _weights(em)["spot"] > 0.5, timeout=20)
            # a decision has seen spot ready, so the next one measures the loss against it
            seen = await eventually(lambda: _status(em)["controlLoop"]["lastDecisionTime"], timeout=10)
            await eventually(lambda: _status(em)["controlLoop"]["lastDecisionTime"] != seen, timeout=10)
            assert _status(em)["mode"] == "cost"
            # every spot pod stops being ready: nothing but the ready count says so
            lost_at = time.monotonic()
            await _ready(em, "spot", 0)
            await eventually(lambda: _status(em).get("mode") == "capacity", timeout=INTERVAL_S + 1.0)
            assert time.monotonic() - lost_at <= INTERVAL_S + 1.0
            obj = em.fetch(DFS, NS, "tiny")
            short = condition(obj, "CapacityShort")
            assert short["status"] == "True" and short["reason"] == "InsufficientCapacity"
            assert "spot" in short["message"]
            assert {p["name"]: p["capacityState"] for p in obj["status"]["pools"]}["spot"] == "Short"
            assert any(r.startswith("spot lost ready capacity: 0 ready") for r in obj["status"]["controlLoop"]["reasons"])
            (lost,) = await eventually(lambda: _events(em, "ReadyCapacityLost"))
            assert lost["type"] == "Warning" and "spot lost ready capacity" in lost["message"]
            switched = await eventually(lambda: _events(em, "ModeChanged"))
            assert "from cost to capacity" in switched[0]["message"]
            # the load moves to the pool that still serves
            await eventually(lambda: _weights(em)["ondemand"] == 1.0)


async def test_a_loss_runs_the_loop_at_once_not_at_the_next_interval():
    """The Deployment watch wakes the loop (`loop.alarms`): the switch comes in about a tick,
    not after the rest of a 6 s interval."""
    interval = 6.0
    async with emulator() as em, operator(em, LOOP):
        await _started(em, _fleet(intervalSeconds=interval))
        async with _workers(em, {"ondemand": 3.0}):
            await eventually(lambda: _replicas(em, "spot") >= 3, timeout=30)
            n = _replicas(em, "spot")
            await _ready(em, "spot", n)
            await eventually(lambda: _weights(em)["spot"] > 0.5, timeout=30)
            seen = await eventually(lambda: _status(em)["controlLoop"]["lastDecisionTime"], timeout=10)
            await eventually(lambda: _status(em)["controlLoop"]["lastDecisionTime"] != seen, timeout=15)
            lost_at = time.monotonic()  # just after a periodic run: the next is ~6 s away
            await _ready(em, "spot", 0)
            await eventually(lambda: _status(em).get("mode") == "capacity", timeout=interval)
            assert time.monotonic() - lost_at < interval / 2


async def test_a_spot_pool_is_hedged_with_on_demand_by_default():
    async with emulator() as em, operator(em, LOOP):
        obj = _fleet()
        del obj["spec"]["controlLoop"]["hedgeSpot"]  # the default: half the demand outside spot
        await _started(em, obj)
        async with _workers(em, {"ondemand": 3.0}):
            reasons = await eventually(
                lambda: [r for r in (_status(em).get("controlLoop") or {}).get("reasons", []) if "hedg" in r],
                timeout=20,
            )
            assert any("spot/c7i" in r for r in reasons)  # the domain derived from the NodePool
            # on-demand keeps enough replicas to serve half the ~3 rps if spot is lost
            await eventually(lambda: _replicas(em, "ondemand") >= 2, timeout=20)
