"""Status conditions and Kubernetes Events: the operator's only ways of explaining itself.

Both are built here by pure functions with fixed reasons (as Karpenter does), so every
message a user can see is defined in one place and tests can assert on it. Conditions are
set through `set_condition`, which stamps the generation and only moves
`lastTransitionTime` when the status actually changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from stepfleet.operator import names

READY = "Ready"
DEGRADED = "Degraded"
CAPACITY_SHORT = "CapacityShort"

# Reasons (CamelCase, stable: alerting and tests match on them).
REASON_INVALID_SPEC = "InvalidSpec"
REASON_AVAILABLE = "Available"
REASON_PROGRESSING = "Progressing"
REASON_POOLS_UNAVAILABLE = "PoolsUnavailable"
REASON_ALL_POOLS_SERVING = "AllPoolsServing"
REASON_NOT_OBSERVED = "NotObserved"
REASON_RECONCILED = "Reconciled"
REASON_CLEANED_UP = "CleanedUp"
#: The finalizer could not delete a NodePool: the DiffusionService stays until it can.
REASON_CLEANUP_FAILED = "CleanupFailed"
REASON_KARPENTER_UNAVAILABLE = "KarpenterUnavailable"
REASON_CHILD_CONFLICT = "ChildConflict"
# Owned by the control loop (stepfleet.operator.loop).
REASON_OBSERVATION_FAILED = "ObservationFailed"
REASON_OBSERVING = "Observing"
REASON_ACTION_FAILED = "ActionFailed"
REASON_INSUFFICIENT_CAPACITY = "InsufficientCapacity"
REASON_CAPACITY_AVAILABLE = "CapacityAvailable"
REASON_MODE_CHANGED = "ModeChanged"
#: A pool's ready replicas fell far below what was ready and planned (outage, interruption).
REASON_CAPACITY_LOST = "ReadyCapacityLost"
#: A pool's workers answer `/readyz` with `failed` (e.g. a family that does not match the checkpoint).
REASON_MODEL_LOAD_FAILED = "ModelLoadFailed"
#: Degraded reasons the loop sets; a reconcile keeps them unless it finds a blocker.
LOOP_DEGRADED_REASONS = (REASON_OBSERVATION_FAILED, REASON_ACTION_FAILED, REASON_MODEL_LOAD_FAILED)
#: Degraded reasons of children that cannot exist; they outrank the loop's.
BLOCKER_REASONS = (REASON_KARPENTER_UNAVAILABLE, REASON_CHILD_CONFLICT)

Condition = dict[str, Any]


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """Return conditions with `type_` set; other conditions are kept as they are."""
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != status
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": timestamp(now) if changed else cond.get("lastTransitionTime", timestamp(now)),
                "observedGeneration": generation,
            }
        )
    if not found:
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": timestamp(now),
                "observedGeneration": generation,
            }
        )
    return out


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == type_), None)


# --- events -----------------------------------------------------------------------------------


def event(
    owner: dict[str, Any], *, type_: str, reason: str, message: str, now: dt.datetime
) -> dict[str, Any]:
    """A core/v1 Event about a DiffusionService (`owner` is its metadata)."""
    stamp = timestamp(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{owner['name']}.", "namespace": owner["namespace"]},
        "involvedObject": {
            "apiVersion": names.CRD_API_VERSION,
            "kind": "DiffusionService",
            "name": owner["name"],
            "namespace": owner["namespace"],
            "uid": owner.get("uid", ""),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": names.MANAGED_BY},
        "reportingComponent": f"stepfleet.io/{names.MANAGED_BY}",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def invalid_spec_event(owner: dict[str, Any], problems: Sequence[Any], now: dt.datetime) -> dict[str, Any]:
    """Warning naming every offending field, e.g. `spec.pools[0].accelerator.type: ...`."""
    return event(owner, type_="Warning", reason=REASON_INVALID_SPEC, message="; ".join(map(str, problems)), now=now)


def reconciled_event(owner: dict[str, Any], changes: Sequence[str], now: dt.datetime) -> dict[str, Any]:
    return event(owner, type_="Normal", reason=REASON_RECONCILED, message="; ".join(changes), now=now)


def cleaned_up_event(owner: dict[str, Any], deleted: Sequence[str], now: dt.datetime) -> dict[str, Any]:
    return event(owner, type_="Normal", reason=REASON_CLEANED_UP, message="deleted " + ", ".join(deleted), now=now)


def cleanup_failed_event(owner: dict[str, Any], failures: Sequence[str], now: dt.datetime) -> dict[str, Any]:
    """Why a deleted DiffusionService does not go away: its finalizer waits for these."""
    return event(
        owner, type_="Warning", reason=REASON_CLEANUP_FAILED, now=now,
        message=f"deletion waits for the finalizer {names.FINALIZER}, retrying: " + "; ".join(failures),
    )
