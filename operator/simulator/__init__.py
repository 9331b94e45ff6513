"""The simulator behind `stepfleet simulate`: the control loop against baselines, measured.

Event-driven and request-level: every request is routed (router weights, then the less busy
of two ready replicas), queued and served or turned away; replicas start, serve, drain, get
lost and bill by the second; capacity comes and goes as the scenario says. `ours` runs the
operator's own pure `decide`, so what the simulator measures is what the operator does.

Modules: `scenario` (the YAML format), `load` (arrivals), `fleet` (replicas and billing),
`engine` (the event loop), `view` (what a controller may observe), `ours` and `baselines`
(the policies), `hpa` (Kubernetes' HPA algorithm), `metrics` and `bound` (what a run is
judged by), `runner` and `cli` (the command). docs/simulator.md has the format and results.
"""
