"""Reconcile one DiffusionService: validate, observe, build, apply, prune, report.

The order follows Karpenter's controllers: read what must be preserved (replicas and
weights the control loop set), compute every child with the pure builders, apply each
idempotently, then remove leftovers (children of pools that left the spec), and finally
derive status from what the children report. An invalid spec stops before any write to a
child. API errors propagate as `kube.ApiError`; the kopf layer turns retryable ones into
quick retries, so a conflict or a 500 only delays convergence.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stepfleet.operator import applying, kube, names, status
from stepfleet.operator import conditions as cond
from stepfleet.operator.children import Observed, Owner, build_all, router
from stepfleet.operator.models import DiffusionServiceSpec, NetworkPeer
from stepfleet.operator.validation import validate

log = logging.getLogger(__name__)

#: Namespaced kinds the operator creates, in the order they are pruned.
NAMESPACED_KINDS = (kube.DEPLOYMENT, kube.PDB, kube.SERVICE, kube.CONFIGMAP, kube.ROLEBINDING, kube.ROLE,
                    kube.SERVICEACCOUNT, kube.NETWORKPOLICY)


@dataclass
class Outcome:
    """What a reconcile decided to report: the status to write and Events to post."""

    status: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    valid: bool = True
    #: Work that failed and must be retried (cleanup: NodePools not yet deleted).
    pending: list[str] = field(default_factory=list)


def owner_of(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta.get("uid", ""), generation=meta.get("generation") or 1)


def observe(
    client: kube.Client, owner: Owner, spec: DiffusionServiceSpec, metrics_peers: tuple[NetworkPeer, ...] = ()
) -> Observed:
    """Read what the builders must carry over instead of overwrite (`metrics_peers`: the operator's own)."""
    replicas: dict[str, int] = {}
    for pool in spec.pools:
        dep = client.get(kube.DEPLOYMENT, owner.namespace, names.worker(owner.name, pool.name))
        if dep is not None and dep.get("spec", {}).get("replicas") is not None:
            replicas[pool.name] = int(dep["spec"]["replicas"])
    weights: dict[str, float] = {}
    control: dict[str, Any] | None = None
    cm = client.get(kube.CONFIGMAP, owner.namespace, names.router(owner.name))
    if cm is not None:
        try:
            cfg = router.parse_config((cm.get("data") or {}).get(names.ROUTER_CONFIG_KEY, ""))
            weights = {p["name"]: float(p["weight"]) for p in cfg.get("pools", [])}
            control = cfg["control"] if isinstance(cfg.get("control"), dict) else None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable router config of %s/%s: %s", owner.namespace, owner.name, exc)
    return Observed(replicas=replicas, weights=weights, control=control,
                    servicemonitor_available=client.serves(kube.SERVICEMONITOR), metrics_peers=metrics_peers)


def _owned(obj: Mapping[str, Any], owner: Owner) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == owner.uid for r in refs)


def prune(client: kube.Client, owner: Owner, desired: list[dict[str, Any]], servicemonitors: bool) -> list[str]:
    """Delete children this service owns that are no longer desired (e.g. a removed pool)."""
    wanted = {(m["kind"], m["metadata"]["name"]) for m in desired}
    selector = names.selector_string({names.LABEL_SERVICE: owner.name, names.LABEL_MANAGED_BY: names.MANAGED_BY})
    deleted: list[str] = []
    kinds = NAMESPACED_KINDS + ((kube.SERVICEMONITOR,) if servicemonitors else ())
    for kind in kinds:
        for obj in client.list(kind, owner.namespace, selector):
            name = obj["metadata"]["name"]
            if (kind.kind, name) not in wanted and _owned(obj, owner) and client.delete(kind, owner.namespace, name):
                deleted.append(f"{kind.kind} {name}")
    for obj in client.list(kube.NODEPOOL, None, _nodepool_selector(owner)):
        name = obj["metadata"]["name"]
        if ("NodePool", name) not in wanted and client.delete(kube.NODEPOOL, None, name):
            deleted.append(f"NodePool {name}")
    return deleted


def _nodepool_selector(owner: Owner) -> str:
    return names.selector_string({names.LABEL_OWNER_NAMESPACE: owner.namespace, names.LABEL_OWNER_NAME: owner.name})


def blockers(client: kube.Client, owner: Owner, spec: DiffusionServiceSpec) -> list[tuple[str, str]]:
    """Why some children cannot exist in this cluster (today: NodePools without Karpenter).

    Everything else is still built; the pools' pods select `karpenter.sh/nodepool` and stay
    Pending until such nodes exist, so this is reported as Degraded and a Warning Event.
    """
    wanted = [names.nodepool(owner.namespace, owner.name, p.name) for p in spec.pools if p.node_pool is not None]
    if wanted and not client.serves(kube.NODEPOOL):
        message = f"karpenter.sh/v1 NodePools are not served by this cluster; not created: {', '.join(wanted)}"
        return [(cond.REASON_KARPENTER_UNAVAILABLE, message)]
    return []


def reconcile(
    client: kube.Client, body: Mapping[str, Any], *, now: dt.datetime, metrics_peers: tuple[NetworkPeer, ...] = ()
) -> Outcome:
    """Make the children match the spec; never raises for a bad spec, only for API errors.

    `metrics_peers`: who besides the router may reach the workers (the operator's `--metrics-from`).
    """
    meta = body["metadata"]
    old_status = dict(body.get("status") or {})
    generation = meta.get("generation")
    spec, problems = validate(meta["name"], body.get("spec"))
    if spec is None:
        return Outcome(
            status=status.invalid(old_status, problems, generation=generation, now=now),
            events=[cond.invalid_spec_event(meta, problems, now)],
            valid=False,
        )
    owner = owner_of(body)
    observed = observe(client, owner, spec, metrics_peers)
    desired = build_all(owner, spec, observed)
    blocked = blockers(client, owner, spec)
    if blocked:
        desired = [m for m in desired if m["kind"] != "NodePool"]
    changes: list[str] = []
    live: dict[str, dict[str, Any]] = {}
    for manifest in desired:
        try:
            action, obj = applying.apply(client, manifest)
        except applying.ChildConflict as exc:
            blocked.append((cond.REASON_CHILD_CONFLICT, str(exc)))
            continue
        if action != "none":
            changes.append(f"{action}d {manifest['kind']} {manifest['metadata']['name']}")
        if manifest["kind"] == "Deployment":
            live[manifest["metadata"]["name"]] = obj
    changes += [f"deleted {what}" for what in prune(client, owner, desired, observed.servicemonitor_available)]
    weights = router.weights(spec.pools, observed)
    new_status = status.build(
        spec, name=owner.name, generation=generation, deployments=live, weights=weights, old=old_status, now=now,
        blockers=blocked,
    )
    events = [cond.reconciled_event(meta, changes, now)] if changes else []
    events += [cond.event(meta, type_="Warning", reason=reason, message=message, now=now) for reason, message in blocked]
    return Outcome(status=new_status, events=events, changes=changes)


def refresh_status(client: kube.Client, namespace: str, name: str, *, now: dt.datetime) -> dict[str, Any] | None:
    """Recompute status after a child changed (e.g. replicas became ready); None if nothing to do."""
    body = client.get(kube.DIFFUSIONSERVICE, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    spec, problems = validate(name, body.get("spec"))
    old = dict(body.get("status") or {})
    if spec is None or old.get("observedGeneration") != body["metadata"].get("generation"):
        return None  # invalid, or a reconcile of a newer generation is pending: it owns status
    owner = owner_of(body)
    deployments = {
        d["metadata"]["name"]: d
        for d in client.list(kube.DEPLOYMENT, namespace, names.selector_string({names.LABEL_SERVICE: name}))
        if _owned(d, owner)
    }
    weights = {p.get("name"): p.get("weight", 0.0) for p in old.get("pools") or []}
    new = status.build(
        spec, name=name, generation=body["metadata"].get("generation"), deployments=deployments,
        weights=weights, old=old, now=now, blockers=blockers(client, owner, spec) + _known_conflicts(old),
    )
    if _same_status(new, old):
        return None
    client.patch(kube.DIFFUSIONSERVICE, namespace, name, {"status": new}, subresource="status")
    return new


def _known_conflicts(old: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Conflicts only a reconcile can re-check; a status refresh carries them over."""
    degraded = cond.get_condition(old.get("conditions") or [], cond.DEGRADED)
    if degraded and degraded.get("reason") == cond.REASON_CHILD_CONFLICT:
        return [(cond.REASON_CHILD_CONFLICT, degraded.get("message", ""))]
    return []


def _same_status(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    strip = lambda s: {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]}  # noqa: E731
    return strip(dict(a)) == strip(dict(b))


def cleanup(client: kube.Client, body: Mapping[str, Any], *, now: dt.datetime) -> Outcome:
    """On delete: remove cluster-scoped NodePools (namespaced children go with owner references).

    Every NodePool is tried even if one fails; those that could not be deleted are `pending`
    (the handler keeps the finalizer and retries) and named in a CleanupFailed Warning, so a
    deletion that hangs says why. A failed list raises `kube.ApiError`.
    """
    owner = owner_of(body)
    deleted: list[str] = []
    failed: list[str] = []
    for obj in client.list(kube.NODEPOOL, None, _nodepool_selector(owner)):
        name = obj["metadata"]["name"]
        try:
            if client.delete(kube.NODEPOOL, None, name):
                deleted.append(f"NodePool {name}")
        except kube.ApiError as exc:
            failed.append(f"NodePool {name}: {exc}")
    events = [cond.cleaned_up_event(body["metadata"], deleted, now)] if deleted else []
    if failed:
        events.append(cond.cleanup_failed_event(body["metadata"], failed, now))
    return Outcome(status={}, events=events, changes=deleted, pending=failed)
