"""`GET /v1/fleet`: the fleet as the router sees it, and what the control loop last decided.

The control loop (the operator's kopf timer, or `stepfleet up`) already tells the router its
decisions through one channel: `router.yaml`, which it rewrites when weights change and the
router re-reads. The decisions' *reasons* travel the same way, in an optional `control`
section (the mode, and the last few decisions: when, mode, replicas, weights, reasons), so
the router needs no second connection to the control plane and serving never imports
operator. Readiness, in-flight work and speed are the router's own live view (`FleetState`).

The section is read leniently: one this router cannot read is left out of the answer, never
a reason to refuse the config (that would freeze the weights).

Pure: a function of the config and a fleet snapshot.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stepfleet.serving.router.config import RouterConfig

#: Decisions shown (newest first); the control loop may send more.
MAX_DECISIONS = 10


class Decision(BaseModel):
    """One control-loop decision as `router.yaml` carries it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: Unix seconds of the decision.
    at: float | None = None
    mode: str | None = None
    replicas: dict[str, int] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)


class ControlSection(BaseModel):
    """`router.yaml`'s optional `control` section."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: str | None = None
    decisions: tuple[Decision, ...] = ()


def control_of(raw: Any) -> ControlSection | None:
    """The `control` section, or None when absent or unreadable."""
    if raw is None:
        return None
    try:
        return ControlSection.model_validate(raw)
    except ValidationError:
        return None


def fleet_view(config: RouterConfig | None, snapshot: dict[str, Any]) -> dict[str, Any]:
    """The `/v1/fleet` answer from the config and `FleetState.snapshot`."""
    control = control_of(config.control) if config is not None else None
    settings = {p.name: p for p in config.pools} if config is not None else {}
    total = sum(p["weight"] for p in snapshot["pools"]) or 0.0
    pools = []
    for p in snapshot["pools"]:
        eps = p["endpoints"]
        conf = settings.get(p["name"])
        pools.append({
            "name": p["name"],
            "weight": p["weight"],
            "share": round(p["weight"] / total, 4) if total else 0.0,
            "accelerator": conf.accelerator if conf else None,
            "price_per_hour": conf.price_per_hour if conf else None,
            "workers": len(eps),
            "ready": sum(1 for e in eps if e["ready"] and not e["down"] and not e["unresponsive"]),
            "inflight": sum(e["inflight"] for e in eps),
        })
    decisions = [d.model_dump() for d in (control.decisions if control else ())][:MAX_DECISIONS]
    return {
        "object": "fleet",
        "service": snapshot.get("service"),
        "model": config.model if config is not None else None,
        "mode": control.mode if control else None,
        "pools": pools,
        "decisions": decisions,
    }
