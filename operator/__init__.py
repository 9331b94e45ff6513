"""The control plane: CRD models, kopf handlers, reconcile, the cost/capacity control loop."""
