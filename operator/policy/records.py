"""Decisions as the router shows them: `router.yaml`'s `control` section.

The router's `GET /v1/fleet` (and the playground's fleet panel) shows the control loop's mode
and its last decisions with their reasons. Both control loops tell the router through the one
channel they already write, `router.yaml` (`serving.router.fleet_view`):

- `stepfleet up` rewrites its file often and sends the last few decisions every time;
- the operator writes the router's ConfigMap only when the weights change (each write is an
  API call and a volume sync on every router pod), so it adds a decision to the section only
  when the weights or the mode change (`next_control`) — the panel then shows the decisions
  that changed the routing, and `status.controlLoop` keeps every tick's reasons.

Pure: plans and dicts in, dicts out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .model import Plan

#: Decisions a `control` section keeps (newest first).
DECISIONS_KEPT = 5


def decision_record(plan: Plan, now_s: float) -> dict[str, Any]:
    """One decision as `control.decisions` carries it."""
    return {"at": round(now_s, 3), "mode": plan.mode, "replicas": dict(plan.replicas),
            "weights": {k: round(v, 4) for k, v in plan.weights.items()}, "reasons": list(plan.reasons)}


def control_section(mode: str, decisions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `control` section from decisions oldest first: the mode and the decisions, newest first."""
    return {"mode": mode, "decisions": [dict(d) for d in reversed(decisions)]}


def next_control(live: Mapping[str, Any] | None, plan: Plan, weights: Mapping[str, float],
                 live_weights: Mapping[str, float], now_s: float) -> dict[str, Any] | None:
    """The section to write with `weights`: the live one unchanged while the weights and the mode
    are, else the plan's decision in front of the live ones (at most `DECISIONS_KEPT`)."""
    live = dict(live) if isinstance(live, Mapping) else None
    if live is not None and live.get("mode") == plan.mode and dict(live_weights) == dict(weights):
        return live
    old = [d for d in (live or {}).get("decisions") or [] if isinstance(d, Mapping)]
    return {"mode": plan.mode, "decisions": [decision_record(plan, now_s), *old][:DECISIONS_KEPT]}
