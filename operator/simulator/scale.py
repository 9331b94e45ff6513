"""The `--scale` scenario: 10 pools of 1,000 replicas each and about a million requests.

It exists to show the simulator (and `decide`) stay fast at fleet sizes well past any
single service: ten accelerator pools (price and throughput variations of the paper's four)
start with 1,000 ready replicas each, load rises from 600 to 1,100 requests per second over
20 minutes, and every event kind fires once. Provisioning delays are shortened to a few
minutes so that replicas asked for during the run also serve in it. Pools of one instance
family (`inf2-a`, `inf2-b`) share a failure domain.
"""

from __future__ import annotations

from .scenario import Scenario, parse

#: (name, price per hour, throughput rps per replica, latency s, provisioning s)
_POOLS = (
    ("inf2-a", 0.7582, 1.75, 0.67, 240),
    ("inf2-b", 0.7900, 1.75, 0.67, 240),
    ("trn1-a", 1.3438, 2.1667, 0.51, 240),
    ("trn1-b", 1.2900, 2.1667, 0.51, 300),
    ("a10g-a", 1.0060, 1.50, 0.68, 180),
    ("a10g-b", 0.9500, 1.45, 0.70, 180),
    ("a10g-c", 1.0800, 1.55, 0.66, 180),
    ("l4-a", 0.8048, 1.0167, 0.96, 180),
    ("l4-b", 0.7700, 0.98, 0.98, 180),
    ("l4-c", 0.8400, 1.05, 0.94, 120),
)


def scale_scenario(seed: int = 5) -> Scenario:
    return parse({
        "name": "scale",
        "description": "10 pools x 1,000 replicas, about 1 M requests in 20 minutes",
        "seed": seed,
        "duration_s": 1200,
        "slo": {"latency_s": 3.0, "percentile": 0.95},
        "control_interval_s": 60,
        "timeout_s": 30,
        "pools": [
            {"name": name, "price_per_hour": price, "throughput_rps_per_replica": rps,
             "latency_s": latency, "provision_s": provision, "min_replicas": 1,
             "max_replicas": 1000, "initial_replicas": 1000,
             # one instance family fails together (the -a/-b/-c variants share it)
             "failure_domain": name.split("-")[0]}
            for name, price, rps, latency, provision in _POOLS],
        "load": {"kind": "cosine", "base_rps": 600, "peak_rps": 1100, "period_s": 2400},
        "events": [
            {"at_s": 200, "kind": "interrupt", "pool": "inf2-a", "fraction": 0.3},
            {"at_s": 400, "kind": "capacity_short", "pool": "inf2-b", "duration_s": 300},
            {"at_s": 600, "kind": "price", "pool": "a10g-b", "price_per_hour": 0.6},
            {"at_s": 800, "kind": "outage", "pool": "inf2-a"},
        ],
    })
