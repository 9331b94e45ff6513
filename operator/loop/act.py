"""Acting on a plan, and reporting it: children, `status`, Events.

Children are written with the same pure builders and the same idempotent `applying.apply`
the reconcile uses, with the plan passed as what must be carried over (`Observed`): so the
loop and a later reconcile agree on every field, and a reconcile after a loop tick writes
nothing. Only what the plan changes is touched: a pool's Deployment when its replicas
differ, the router ConfigMap when weights differ, an existing NodePool when its limits do
(the loop never creates a NodePool; that is the reconcile's, and it reports a cluster
without Karpenter).

Status and Events are built by pure functions here, with the condition and Event helpers
of `conditions`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from stepfleet.operator import applying, kube, names
from stepfleet.operator import conditions as cond
from stepfleet.operator.children import Observed, Owner, nodepools, router, workers
from stepfleet.operator.models import DiffusionServiceSpec, PoolSpec
from stepfleet.operator.policy import Plan, PolicyState, records
from stepfleet.operator.policy.model import PoolMemory

from .capacity import LoadFailure
from .pods import format_time, parse_time

#: Router weights are written with this many decimals (as the reconcile's defaults).
WEIGHT_DECIMALS = 6


def weights(plan: Plan) -> dict[str, float]:
    return {name: round(w, WEIGHT_DECIMALS) for name, w in plan.weights.items()}


def nodepool_limits(pool: PoolSpec, replicas: int) -> dict[str, str]:
    """NodePool limits for `replicas` replicas (limits the user set in the spec win)."""
    assert pool.node_pool is not None
    if pool.node_pool.limits is not None:
        return nodepools.limits(pool)
    return nodepools.limits(pool.model_copy(update={"max_replicas": replicas}))


def apply_plan(
    client: kube.Client,
    owner: Owner,
    spec: DiffusionServiceSpec,
    plan: Plan,
    deployments: Mapping[str, Mapping[str, Any] | None],
    now_s: float = 0.0,
) -> list[str]:
    """Write what the plan changes; returns what was changed. Raises kube.ApiError, ChildConflict.

    `now_s` (Unix seconds) stamps the decision the router's config records when the weights or
    the mode change (`policy.records.next_control`).

    The plan was made from `spec` and `deployments` as read at the start of the run; the
    reconcile may have applied a newer spec since (pruned a pool, changed the pod template).
    So the loop never creates a child (that is the reconcile's), and patches a Deployment
    only if its spec is still the generation it read: otherwise 409, and the next run decides
    again on fresh reads instead of rolling the pool back to the old spec.
    """
    live_config = _same_pools_as_router(client, owner, spec)
    live_weights = {p.get("name"): p.get("weight") for p in (live_config or {}).get("pools") or []}
    control = records.next_control((live_config or {}).get("control"), plan, weights(plan), live_weights, now_s)
    observed = Observed(replicas=plan.replicas, weights=weights(plan), control=control)
    changes: list[str] = []
    for pool in spec.pools:
        live = deployments.get(pool.name)
        if live is None:
            continue  # not created yet: the reconcile builds it
        want = plan.replicas[pool.name]
        if int((live.get("spec") or {}).get("replicas") or 0) != want:
            action, _ = applying.apply(client, workers.deployment(owner, spec, pool, observed), create=False,
                                       expect_generation=(live.get("metadata") or {}).get("generation"))
            if action != "absent":
                changes.append(f"{pool.name} replicas {want}")
    action, _ = applying.apply(client, router.configmap(owner, spec, observed), create=False)
    if action not in ("none", "absent"):
        changes.append("router weights " + ", ".join(f"{k} {v:.2f}" for k, v in observed.weights.items()))
    for pool in spec.pools:
        if pool.node_pool is None:
            continue
        name = names.nodepool(owner.namespace, owner.name, pool.name)
        live_np = client.get(kube.NODEPOOL, None, name)
        if live_np is None:
            continue
        limits = nodepool_limits(pool, plan.nodepool_limits[pool.name])
        if (live_np.get("spec") or {}).get("limits") == limits:
            continue
        manifest = nodepools.nodepool(owner, pool)
        manifest["spec"]["limits"] = limits
        action, _ = applying.apply(client, manifest, create=False,
                                   expect_generation=(live_np.get("metadata") or {}).get("generation"))
        if action not in ("none", "absent"):
            changes.append(f"NodePool {name} limits {limits}")
    return changes


def _same_pools_as_router(client: kube.Client, owner: Owner, spec: DiffusionServiceSpec) -> dict[str, Any] | None:
    """The router's live config (None: absent or unreadable); 409 when it lists other pools than
    the loop's spec: the reconcile has applied a newer spec, and stale weights would drop a new
    pool's traffic until next run."""
    live = client.get(kube.CONFIGMAP, owner.namespace, names.router(owner.name))
    if live is None:
        return None
    try:
        config = router.parse_config((live.get("data") or {}).get(names.ROUTER_CONFIG_KEY, ""))
        listed = {p["name"] for p in config.get("pools", [])}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: the loop's own config replaces it
    if listed != {p.name for p in spec.pools}:
        raise kube.ApiError(409, "Conflict", f"the router config lists pools {sorted(listed)}, the loop's spec "
                                             f"{sorted(p.name for p in spec.pools)}: the spec changed meanwhile")


# --- status -----------------------------------------------------------------------------------


def state_from_status(status: Mapping[str, Any] | None) -> PolicyState:
    """What survives an operator restart: the mode, since when, and the pools seen short."""
    status = status or {}
    loop = status.get("controlLoop") or {}
    if not loop.get("modeSince"):
        return PolicyState()  # the loop never decided: `status.mode` is only the reconcile's default
    mode = status.get("mode") if status.get("mode") in ("cost", "capacity") else "cost"
    short = {pool: parse_time(since) for pool, since in (loop.get("shortSince") or {}).items()}
    return PolicyState(
        mode=mode,
        mode_since_s=parse_time(loop.get("modeSince")),
        pools=tuple(PoolMemory(name=pool, short_since=since) for pool, since in short.items() if since is not None),
    )


def decided_status(
    old: Mapping[str, Any],
    spec: DiffusionServiceSpec,
    plan: Plan,
    state: PolicyState,
    *,
    demand_rps: float,
    shortages: Mapping[str, float],
    generation: int | None,
    now: dt.datetime,
    load_failures: Mapping[str, LoadFailure] | None = None,
) -> dict[str, Any]:
    """The status fields the loop owns after a decision (a merge patch of `status`).

    `load_failures` (pools whose workers failed to load the model) make the service
    Degraded/ModelLoadFailed; once there are none, the loop's Degraded clears.
    """
    load_failures = load_failures or {}
    old_pools = {p.get("name"): p for p in old.get("pools") or []}
    w = weights(plan)
    pools = []
    for pool in spec.pools:
        entry = dict(old_pools.get(pool.name) or {"name": pool.name, "readyReplicas": 0})
        replicas = plan.replicas[pool.name]
        entry.update(
            replicas=replicas,
            weight=w[pool.name],
            capacityState="Short" if pool.name in shortages else "Available",
            costPerHour=round(replicas * pool.price_per_hour, 4),
        )
        pools.append(entry)
    conditions = list(old.get("conditions") or [])
    if shortages:
        listed = ", ".join(f"{p} since {format_time(s)}" for p, s in sorted(shortages.items()))
        short = ("True", cond.REASON_INSUFFICIENT_CAPACITY, f"pools without capacity: {listed}")
    else:
        short = ("False", cond.REASON_CAPACITY_AVAILABLE, "every pool can get capacity")
    conditions = cond.set_condition(conditions, cond.CAPACITY_SHORT, *short, generation=generation, now=now)
    if load_failures:
        conditions = load_failed_conditions(conditions, load_failures, generation=generation, now=now)
    else:
        conditions = clear_loop_degraded(conditions, generation=generation, now=now)
    remembered = {m.name: format_time(m.short_since) for m in state.pools if m.short_since is not None}
    old_loop = old.get("controlLoop") or {}
    return {
        "mode": plan.mode,
        "pools": pools,
        "totalCostPerHour": round(plan.cost_per_hour, 4),
        "conditions": conditions,
        "controlLoop": {
            "lastDecisionTime": cond.timestamp(now),
            "modeSince": format_time(state.mode_since_s) if state.mode_since_s is not None else None,
            "demandRps": round(demand_rps, 4),
            "plannedRps": round(plan.planned_rps, 4),
            "shortSince": _map_patch(old_loop.get("shortSince"), remembered),
            "modelLoadFailures": _map_patch(
                old_loop.get("modelLoadFailures"), {p: f.message for p, f in sorted(load_failures.items())}
            ),
            "reasons": list(plan.reasons)[:32],
            "lastError": None,
        },
    }


def _map_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """`new` as a merge patch over `old`: a merge patch keeps keys it does not name, so the
    ones gone are named with None (which removes them)."""
    return {**{k: None for k in old or {} if k not in new}, **new}


def load_failed_message(failures: Mapping[str, LoadFailure]) -> str:
    """Every failing pool's workers' message, prefixed by the pool's name."""
    return "; ".join(f"pool {pool}: {failure.message}" for pool, failure in sorted(failures.items()))


def load_failed_conditions(
    conditions: list[dict[str, Any]], failures: Mapping[str, LoadFailure], *, generation: int | None, now: dt.datetime
) -> list[dict[str, Any]]:
    """Degraded/ModelLoadFailed naming each pool and its workers' error, unless a blocker holds it."""
    degraded = cond.get_condition(conditions, cond.DEGRADED) or {}
    if degraded.get("status") == "True" and degraded.get("reason") in cond.BLOCKER_REASONS:
        return conditions
    return cond.set_condition(
        conditions, cond.DEGRADED, "True", cond.REASON_MODEL_LOAD_FAILED, load_failed_message(failures),
        generation=generation, now=now,
    )


def load_failure_events(
    meta: Mapping[str, Any], old: Mapping[str, Any], failures: Mapping[str, LoadFailure], now: dt.datetime
) -> list[dict[str, Any]]:
    """A Warning per pool whose failure is new or says something new since the last decision
    (`old` is the status before it), so a failing pool is announced once, not every tick."""
    announced = (old.get("controlLoop") or {}).get("modelLoadFailures") or {}
    return [
        cond.event(
            dict(meta), type_="Warning", reason=cond.REASON_MODEL_LOAD_FAILED,
            message=f"pool {pool}: {failure.message} (pods: {_few(failure.pods)})",
            now=now,
        )
        for pool, failure in sorted(failures.items())
        if announced.get(pool) != failure.message
    ]


def clear_loop_degraded(conditions: list[dict[str, Any]], *, generation: int | None, now: dt.datetime) -> list[dict[str, Any]]:
    """Clear a Degraded the loop set earlier, once its cause is gone."""
    degraded = cond.get_condition(conditions, cond.DEGRADED)
    if degraded and degraded.get("reason") in cond.LOOP_DEGRADED_REASONS:
        return cond.set_condition(
            conditions, cond.DEGRADED, "False", cond.REASON_OBSERVING,
            "the control loop observes the fleet and acts again", generation=generation, now=now,
        )
    return conditions


def failed_status(
    old: Mapping[str, Any], reason: str, message: str, *, generation: int | None, now: dt.datetime
) -> dict[str, Any]:
    """Degraded with the loop's reason, unless the reconcile reports a child that cannot exist."""
    conditions = list(old.get("conditions") or [])
    degraded = cond.get_condition(conditions, cond.DEGRADED) or {}
    if not (degraded.get("status") == "True" and degraded.get("reason") in cond.BLOCKER_REASONS):
        conditions = cond.set_condition(conditions, cond.DEGRADED, "True", reason, message, generation=generation, now=now)
    loop = dict(old.get("controlLoop") or {})
    loop["lastError"] = message[:1024]
    return {"conditions": conditions, "controlLoop": loop}


def newly_degraded(old: Mapping[str, Any], new: Mapping[str, Any], reason: str) -> bool:
    before = cond.get_condition(old.get("conditions") or [], cond.DEGRADED) or {}
    after = cond.get_condition(new.get("conditions") or [], cond.DEGRADED) or {}
    return after.get("reason") == reason and (before.get("reason") != reason or before.get("status") != "True")


def mode_event(meta: Mapping[str, Any], previous: str, plan: Plan, now: dt.datetime) -> dict[str, Any]:
    why = "; ".join(r for r in plan.reasons if "mode" in r) or "; ".join(plan.reasons)
    return cond.event(
        dict(meta), type_="Normal", reason=cond.REASON_MODE_CHANGED,
        message=f"switched from {previous} to {plan.mode} mode: {why}", now=now,
    )


def capacity_lost_event(meta: Mapping[str, Any], pool: str, plan: Plan, now: dt.datetime) -> dict[str, Any]:
    """A Warning when a pool's ready replicas vanish: what was lost and what the plan does about it."""
    lost = next((r for r in plan.reasons if r.startswith(f"{pool} lost ready capacity")), f"{pool} lost ready capacity")
    return cond.event(
        dict(meta), type_="Warning", reason=cond.REASON_CAPACITY_LOST,
        message=f"{lost}; now in {plan.mode} mode", now=now,
    )


def failure_event(meta: Mapping[str, Any], reason: str, message: str, now: dt.datetime) -> dict[str, Any]:
    return cond.event(dict(meta), type_="Warning", reason=reason, message=message, now=now)


def _few(items: tuple[str, ...], shown: int = 3) -> str:
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")
