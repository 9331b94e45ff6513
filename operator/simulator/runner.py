"""Run policies over a scenario and gather the results the CLI prints.

Every policy gets the same arrivals and the same random draws (common random numbers), so
differences between them come from their decisions, not from luck.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .baselines import HpaBaseline, PaperLoop, StaticCheapest, StaticMixed
from .bound import cost_lower_bound
from .controller import Controller
from .engine import Draws, RunLog, simulate
from .load import arrivals
from .metrics import summarize
from .ours import Ours
from .scenario import Scenario
from .spothedge import SpotHedge

POLICIES: dict[str, Callable[[Scenario], Controller]] = {
    "ours": Ours,
    "static-cheapest": StaticCheapest,
    "static-mixed": StaticMixed,
    "paper": PaperLoop,
    "hpa": HpaBaseline,
    "spothedge": SpotHedge,
}


def draw(scenario: Scenario, seed: int | None = None) -> Draws:
    rng = np.random.default_rng(scenario.seed if seed is None else seed)
    return Draws.draw(arrivals(scenario, rng), rng)


def run_policy(scenario: Scenario, policy: str, draws: Draws,
               keep_reasons: bool = False) -> RunLog:
    if policy not in POLICIES:
        raise KeyError(f"unknown policy {policy!r}; have {', '.join(POLICIES)}")
    return simulate(scenario, POLICIES[policy](scenario), draws, keep_reasons=keep_reasons)


def run(scenario: Scenario, policies: Sequence[str], seed: int | None = None,
        on_run: Callable[[RunLog], None] | None = None) -> dict[str, object]:
    """The CLI's JSON document for `policies` over `scenario`."""
    started = time.perf_counter()
    draws = draw(scenario, seed)
    results: dict[str, object] = {}
    for name in policies:
        log = run_policy(scenario, name, draws)
        results[name] = summarize(log).as_dict()
        if on_run is not None:
            on_run(log)
    return {
        "scenario": scenario.name,
        "seed": scenario.seed if seed is None else seed,
        "duration_s": scenario.duration_s,
        "requests": int(len(draws.arrival_s)),
        "policies": results,
        "cost_lower_bound_usd": round(cost_lower_bound(scenario), 4),
        "wall_s": round(time.perf_counter() - started, 3),
    }
