"""The interface every simulated control loop implements, ours and the baselines alike.

The engine calls `step(view)` at t=0 and then every `period_s` seconds — and, for a
controller with `react_to_loss_s` set, also that long after any loss of running replicas
(the operator's Deployment watch wakes its loop early; the periodic ticks go on as before);
the controller answers with the replicas it wants per pool and the router weights, either of which may be
left unchanged (None). Giving every policy the same interface, the same fleet and the same
requests is what makes the comparison fair.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .view import FleetView


@dataclass(frozen=True)
class Actions:
    replicas: Mapping[str, int] | None = None
    weights: Mapping[str, float] | None = None
    mode: str | None = None
    reasons: tuple[str, ...] = field(default_factory=tuple)


class Controller(Protocol):
    name: str
    period_s: float
    #: Seconds from a loss of running replicas to an extra `step` (None, or absent: ticks only).
    react_to_loss_s: float | None

    def step(self, view: FleetView) -> Actions: ...
