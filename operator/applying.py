"""Create-or-patch of one child, idempotently, with a three-way merge like `kubectl apply`.

The last manifest the operator applied is kept in an annotation. A child is left alone when
that record equals the new desired manifest *and* the live object still contains it (so a
hand edit of a managed field is reverted). Otherwise it is merge-patched with the desired
manifest plus explicit nulls for fields the operator set before and no longer wants, which
a plain merge patch would leave behind (e.g. a nodeSelector key of a removed NodePool).

Pure functions, except `apply`, which takes the client.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from stepfleet.operator import kube, names


def contains(live: Any, desired: Any) -> bool:
    """Whether `live` has every field of `desired` (server-side defaults may add more)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(contains, live, desired))
    return live == desired


def removals(last: Any, desired: Any) -> Any:
    """A merge-patch fragment nulling the keys present in `last` but gone from `desired`."""
    if not isinstance(last, dict) or not isinstance(desired, dict):
        return None
    out: dict[str, Any] = {}
    for key, old in last.items():
        if key not in desired:
            out[key] = None
        else:
            sub = removals(old, desired[key])
            if sub:
                out[key] = sub
    return out or None


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge (used to fold the removals into the desired manifest)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _record(desired: dict[str, Any]) -> str:
    return json.dumps(desired, sort_keys=True, separators=(",", ":"))


def with_record(desired: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(desired)
    out["metadata"].setdefault("annotations", {})[names.ANNOTATION_APPLIED] = _record(desired)
    return out


def plan(live: dict[str, Any] | None, desired: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """("create", body) | ("patch", merge patch) | ("none", None) for one child."""
    if live is None:
        return "create", with_record(desired)
    raw = (live.get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_APPLIED)
    try:
        last = json.loads(raw) if raw else None
    except ValueError:
        last = None
    if last == desired and contains(live, desired):
        return "none", None
    body = with_record(desired)
    gone = removals(last, desired) if last else None
    if gone:
        body = _overlay_nulls(body, gone)
    return "patch", body


def _overlay_nulls(body: dict[str, Any], gone: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    for key, value in gone.items():
        if value is None:
            out[key] = None
        elif isinstance(out.get(key), dict):
            out[key] = _overlay_nulls(out[key], value)
    return out


class ChildConflict(Exception):
    """A child's name is taken by an object this service does not own; it is left alone."""


def owned_by_same(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether `live` belongs to the owner `desired` names (owner reference, or owner labels if cluster-scoped)."""
    want_refs = {r["uid"] for r in desired["metadata"].get("ownerReferences") or []}
    if want_refs:
        return any(r.get("uid") in want_refs for r in live.get("metadata", {}).get("ownerReferences") or [])
    labels = live.get("metadata", {}).get("labels") or {}
    wanted = desired["metadata"].get("labels") or {}
    return all(labels.get(k) == wanted.get(k) for k in (names.LABEL_OWNER_NAMESPACE, names.LABEL_OWNER_NAME))


def apply(
    client: kube.Client, desired: dict[str, Any], *, create: bool = True, expect_generation: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Bring one child to `desired`; returns (action, live object afterwards).

    Raises `ChildConflict` rather than take over an object someone else owns. Two guards for
    a writer whose view may be stale (the control loop decides on what it read an interval
    ago, while the reconcile may have moved on to a newer spec): `create=False` never creates
    (action "absent" when the child is gone, e.g. pruned with its pool); `expect_generation`
    is the `metadata.generation` the writer read: a child whose spec changed since (a newer
    reconcile, a hand edit) raises a 409 `kube.ApiError` instead of being reverted. The
    generation, not the resourceVersion: a Deployment's status moves with every pod that
    becomes ready, and that must not make the loop miss its turn.
    """
    kind = kube.kind_of(desired)
    meta = desired["metadata"]
    live = client.get(kind, meta.get("namespace"), meta["name"])
    if live is not None and not owned_by_same(live, desired):
        raise ChildConflict(f"{desired['kind']} {meta['name']} exists and is not owned by this DiffusionService")
    if live is None and not create:
        return "absent", {}
    if live is not None and expect_generation is not None and live["metadata"].get("generation") != expect_generation:
        raise kube.ApiError(409, "Conflict", f"{desired['kind']} {meta['name']} changed since it was read "
                                             f"(generation {expect_generation} -> {live['metadata'].get('generation')})")
    action, body = plan(live, desired)
    if action == "create":
        return action, client.create(body)  # a 409 (created meanwhile) is retried by the caller
    if action == "patch":
        assert body is not None
        return action, client.patch(kind, meta.get("namespace"), meta["name"], body)
    assert live is not None
    return action, live
