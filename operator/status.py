"""Compute a DiffusionService's `status` from what its children report. Pure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from stepfleet.operator import conditions as cond
from stepfleet.operator import names
from stepfleet.operator.models import DiffusionServiceSpec


def _counts(deployment: Mapping[str, Any] | None) -> tuple[int, int]:
    if not deployment:
        return 0, 0
    return int(deployment.get("spec", {}).get("replicas") or 0), int(deployment.get("status", {}).get("readyReplicas") or 0)


def build(
    spec: DiffusionServiceSpec,
    *,
    name: str,
    generation: int | None,
    deployments: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, float],
    old: Mapping[str, Any],
    now: dt.datetime,
    blockers: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The full status (conditions included); `deployments` maps child name -> live object.

    `blockers` are (reason, message) pairs for children that cannot exist (no Karpenter, a
    name taken by a foreign object); they make the service Degraded whatever the replicas.

    Capacity state, mode and the CapacityShort condition belong to the control loop: they are
    carried over from `old` and only initialised here.
    """
    old_pools = {p.get("name"): p for p in old.get("pools") or []}
    pools: list[dict[str, Any]] = []
    total = 0.0
    for pool in spec.pools:
        replicas, ready = _counts(deployments.get(names.worker(name, pool.name)))
        cost = round(replicas * pool.price_per_hour, 4)
        total += cost
        pools.append(
            {
                "name": pool.name,
                "replicas": replicas,
                "readyReplicas": ready,
                "weight": float(weights.get(pool.name, 0.0)),
                "capacityState": old_pools.get(pool.name, {}).get("capacityState", "Unknown"),
                "costPerHour": cost,
            }
        )
    router_replicas, router_ready = _counts(deployments.get(names.router(name)))
    wanted = [p for p in pools if p["replicas"] > 0]
    not_ready = [p["name"] for p in wanted if p["readyReplicas"] == 0]
    serving = [p["name"] for p in wanted if p["readyReplicas"] > 0]

    conditions: list[dict[str, Any]] = list(old.get("conditions") or [])
    if router_ready > 0 and not not_ready and (serving or not wanted):
        ready = ("True", cond.REASON_AVAILABLE, f"router and {len(serving)} pool(s) serving")
    else:
        waiting = not_ready + (["router"] if router_ready == 0 and spec.router.replicas > 0 else [])
        ready = ("False", cond.REASON_PROGRESSING, "waiting for ready replicas: " + ", ".join(waiting or ["-"]))
    conditions = cond.set_condition(conditions, cond.READY, *ready, generation=generation, now=now)
    previous = cond.get_condition(conditions, cond.DEGRADED) or {}
    if blockers:
        degraded = ("True", blockers[0][0], "; ".join(message for _, message in blockers))
    elif previous.get("status") == "True" and previous.get("reason") in cond.LOOP_DEGRADED_REASONS:
        # The control loop's finding (e.g. Prometheus unreachable): only the loop clears it.
        degraded = ("True", previous["reason"], previous.get("message", ""))
    elif not_ready and serving:
        degraded = ("True", cond.REASON_POOLS_UNAVAILABLE, "no ready replicas in " + ", ".join(not_ready))
    else:
        degraded = ("False", cond.REASON_ALL_POOLS_SERVING, "no pool with replicas lacks ready ones")
    conditions = cond.set_condition(conditions, cond.DEGRADED, *degraded, generation=generation, now=now)
    if cond.get_condition(conditions, cond.CAPACITY_SHORT) is None:
        conditions = cond.set_condition(
            conditions, cond.CAPACITY_SHORT, "Unknown", cond.REASON_NOT_OBSERVED,
            "the control loop has not observed capacity yet", generation=generation, now=now,
        )
    mode = spec.mode if spec.mode != "auto" else (old.get("mode") or "cost")
    return {
        "observedGeneration": generation,
        "mode": mode,
        "pools": pools,
        "totalCostPerHour": round(total, 4),
        "conditions": conditions,
    }


def invalid(
    old: Mapping[str, Any], problems: Sequence[Any], *, generation: int | None, now: dt.datetime
) -> dict[str, Any]:
    """Status for a spec that cannot be reconciled: children untouched, Ready=False/InvalidSpec."""
    conditions = cond.set_condition(
        list(old.get("conditions") or []), cond.READY, "False", cond.REASON_INVALID_SPEC,
        "; ".join(map(str, problems)), generation=generation, now=now,
    )
    return {**dict(old), "observedGeneration": generation, "conditions": conditions}
