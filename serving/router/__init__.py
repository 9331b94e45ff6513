"""The router: one OpenAI-compatible endpoint in front of several worker pools.

Layers, importing downward only: `cli` → `app` → (`forwarding`, `discovery`, `auth`,
`metrics`, `state`) → (`balancing`, `costing`, `config`). `balancing` and `costing` are pure:
no I/O, no clock reads; the benchmark's simulator drives exactly the code the router runs.
"""
