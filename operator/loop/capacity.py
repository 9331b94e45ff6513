"""Capacity signals per pool, from Events, pods and the workers' own `/readyz`.

Karpenter `InsufficientCapacityError` Events on NodeClaims of the pool's NodePool
(Karpenter deletes such NodeClaims at once, so a claim is matched by its
`karpenter.sh/nodepool` label when it still exists, else by its name, which Karpenter
derives from the NodePool's), counted while seen within a window; pool pods Pending as
Unschedulable for longer than the grace period; placed pods that stay un-ready; and pools
whose workers answer `/readyz` with `failed` (`load_failures`: the model will not load, so
the pool is short at once, and the loop reports the workers' error as
Degraded/ModelLoadFailed). A sudden loss of ready replicas is the policy's own signal
(`policy.losses`): it needs the last plan, which only the policy remembers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .pods import parse_time, pod_pool, unready_since

#: Event reason Karpenter posts on a NodeClaim it could not launch.
INSUFFICIENT_CAPACITY_REASON = "InsufficientCapacityError"
KARPENTER_NODEPOOL_LABEL = "karpenter.sh/nodepool"


def _event_times(event: Mapping[str, Any]) -> tuple[float | None, float | None]:
    meta = event.get("metadata") or {}
    first = parse_time(event.get("firstTimestamp")) or parse_time(event.get("eventTime")) or parse_time(
        meta.get("creationTimestamp")
    )
    last = (
        parse_time(event.get("lastTimestamp"))
        or parse_time((event.get("series") or {}).get("lastObservedTime"))
        or parse_time(event.get("eventTime"))
        or first
    )
    return first, last


def _claim_nodepool(claim: str, labels: Mapping[str, str], nodepools: Iterable[str]) -> str | None:
    if labels.get(KARPENTER_NODEPOOL_LABEL):
        return labels[KARPENTER_NODEPOOL_LABEL]
    matches = [np for np in nodepools if claim.startswith(np + "-")]
    return max(matches, key=len) if matches else None


def shortages_from_events(
    events: Iterable[Mapping[str, Any]],
    nodeclaims: Iterable[Mapping[str, Any]],
    nodepools: Mapping[str, str],
    now_s: float,
    window_s: float,
) -> dict[str, float]:
    """pool -> since when Karpenter could not launch its nodes (events seen within `window_s`).

    `nodepools` maps pool -> its NodePool's name; pools without one have no such signal.
    """
    pool_of = {np: pool for pool, np in nodepools.items()}
    claim_labels = {
        (c.get("metadata") or {}).get("name", ""): (c.get("metadata") or {}).get("labels") or {} for c in nodeclaims
    }
    out: dict[str, float] = {}
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") != INSUFFICIENT_CAPACITY_REASON or involved.get("kind") != "NodeClaim":
            continue
        claim = involved.get("name") or ""
        nodepool = _claim_nodepool(claim, claim_labels.get(claim, {}), pool_of)
        pool = pool_of.get(nodepool or "")
        first, last = _event_times(event)
        if pool is None or last is None or last < now_s - window_s:
            continue
        since = min(first if first is not None else last, last)
        out[pool] = min(out.get(pool, since), since)
    return out


def _unschedulable_since(pod: Mapping[str, Any]) -> float | None:
    status = pod.get("status") or {}
    if status.get("phase") != "Pending":
        return None
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return parse_time(c.get("lastTransitionTime")) or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    return None



def shortages_from_pods(pods: Iterable[Mapping[str, Any]], now_s: float, grace_s: float) -> dict[str, float]:
    """pool -> since when its oldest pod has been Unschedulable, counting only pods past the grace."""
    out: dict[str, float] = {}
    for pod in pods:
        pool, since = pod_pool(pod), _unschedulable_since(pod)
        if pool is None or since is None or now_s - since < grace_s:
            continue
        out[pool] = min(out.get(pool, since), since)
    return out





def shortages_from_unready_pods(
    pods: Iterable[Mapping[str, Any]], now_s: float, stuck_grace_s: float, readiness_timeout_s: float,
    pool_timeouts_s: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """pool -> since when a scheduled pod has failed to become Ready.

    Scheduled pods that never turn Ready give a pool no capacity, like pods that cannot be
    placed: a crash loop or an image that cannot be pulled counts after `stuck_grace_s`; a
    pod that runs but stays un-ready (a model that fails to load keeps the worker up with
    /readyz at 503) counts after `readiness_timeout_s`, which must cover a normal model load
    (0 turns this second signal off). `pool_timeouts_s` overrides it per pool: a compiled
    pool's timeout adds its warm-up compiles (`operator.compilation.readiness_timeouts`).
    """
    out: dict[str, float] = {}
    for pod in pods:
        pool, found = pod_pool(pod), unready_since(pod)
        if pool is None or found is None:
            continue
        since, stuck = found
        waited = now_s - since
        timeout = (pool_timeouts_s or {}).get(pool, readiness_timeout_s)
        if (stuck and waited >= stuck_grace_s) or (timeout > 0 and waited >= timeout):
            out[pool] = min(out.get(pool, since), since)
    return out


def merge_shortages(*sources: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for source in sources:
        for pool, since in source.items():
            out[pool] = min(out.get(pool, since), since)
    return out


# --- model loads ----------------------------------------------------------------------------

#: Longest worker error kept per pool (a condition holds every pool's; an Event 1 KiB).
MAX_LOAD_ERROR_CHARS = 900


@dataclass(frozen=True)
class LoadFailure:
    """A pool whose workers gave up loading the model: their `/readyz` answered `failed`.

    Such a worker stays up (for diagnosis) but will never serve: a configuration error (a
    family that does not match the checkpoint, a missing revision) that only a spec change
    fixes, so the pool counts as short at once rather than after `readinessTimeoutSeconds`.
    """

    pool: str
    #: The workers' distinct messages (`FamilyMismatch: ...`), sorted.
    errors: tuple[str, ...]
    #: The pods that answered `failed`, sorted.
    pods: tuple[str, ...]
    #: Since when the longest-failing of them has not been Ready.
    since_s: float

    @property
    def message(self) -> str:
        return "; ".join(self.errors)


def readyz_failure(status_code: int, body: str) -> str | None:
    """The worker's error if a `/readyz` answer says the model load failed, else None.

    The body is `{"status": "loading"|"failed"|"ready", "error": str|None}`; anything else
    (a proxy's page, a worker too old to say) is no evidence of a failure and is ignored:
    the pod still counts as short after `readinessTimeoutSeconds`.
    """
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    if not isinstance(decoded, Mapping) or decoded.get("status") != "failed":
        return None
    error = decoded.get("error")
    text = error.strip() if isinstance(error, str) else ""
    text = text or f"model load failed (HTTP {status_code}, no reason given)"
    return text if len(text) <= MAX_LOAD_ERROR_CHARS else text[: MAX_LOAD_ERROR_CHARS - 1] + "…"


def load_failures(
    answers: Mapping[str, tuple[int, str] | None], pods: Iterable[Mapping[str, Any]], now_s: float
) -> dict[str, LoadFailure]:
    """pool -> its failed model loads, from `/readyz` answers by pod name (None: no answer)."""
    found: dict[str, list[tuple[str, str, float]]] = {}
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name")
        pool, answer = pod_pool(pod), answers.get(name or "")
        if pool is None or answer is None:
            continue
        error = readyz_failure(*answer)
        if error is None:
            continue
        unready = unready_since(pod)
        found.setdefault(pool, []).append((name or "", error, unready[0] if unready else now_s))
    return {
        pool: LoadFailure(
            pool=pool,
            errors=tuple(sorted({e for _, e, _ in items})),
            pods=tuple(sorted(n for n, _, _ in items)),
            since_s=min(s for _, _, s in items),
        )
        for pool, items in found.items()
    }

