"""The control loop's wiring into the operator: observe, `decide`, act, report.

The decision itself is the pure `stepfleet.operator.policy.decide`; this package only feeds
it and carries out its plan. `observe` is pure (raw samples, Events and objects in, an
`Observation` out), `sources` does the reading (Kubernetes, Prometheus, worker `/metrics`),
`act` writes children, status and Events, and `timer` is the kopf timer tying them together.
"""

from .timer import LoopMemory, Outcome, register, run_once

__all__ = ["LoopMemory", "Outcome", "register", "run_once"]
