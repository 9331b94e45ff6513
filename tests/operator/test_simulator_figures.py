"""The issue's figures on the built-in scenarios.

The full days take about a minute each on two cores, so they are marked slow (run them
with `pytest -m slow tests/operator/test_simulator_figures.py`); a compressed shortage day
keeps the comparison with the paper's loop in the default run.
"""

from __future__ import annotations

import time

import pytest

from stepfleet.operator.simulator.runner import run
from stepfleet.operator.simulator.scale import scale_scenario
from stepfleet.operator.simulator.scenario import load_builtin


def test_compressed_shortage_ours_beats_the_paper_loop():
    full = load_builtin("shortage")
    short = full.model_copy(update={
        "duration_s": 21600.0,
        "load": full.load.model_copy(update={"period_s": 21600.0, "peak_rps": 40.0}),
        "events": (full.events[0].model_copy(update={"at_s": 8000.0, "duration_s": 2800.0}),),
    })
    doc = run(short, ["ours", "paper"])
    ours, paper = doc["policies"]["ours"], doc["policies"]["paper"]
    assert ours["mode_switches"] == 2  # into capacity mode and back
    assert ours["slo_attainment"] > paper["slo_attainment"]
    assert ours["cost_per_1k_images"] <= paper["cost_per_1k_images"]


@pytest.mark.slow
def test_shortage_figures():
    doc = run(load_builtin("shortage"), ["ours", "paper"])
    ours, paper = doc["policies"]["ours"], doc["policies"]["paper"]
    assert ours["slo_attainment"] >= 0.99
    assert ours["slo_attainment"] > paper["slo_attainment"]
    assert ours["cost_per_1k_images"] <= paper["cost_per_1k_images"]


@pytest.mark.slow
def test_diurnal_figures():
    doc = run(load_builtin("diurnal"), ["ours"])
    ours = doc["policies"]["ours"]
    assert ours["slo_attainment"] >= 0.99
    assert ours["cost_usd"] <= 1.15 * doc["cost_lower_bound_usd"]


@pytest.mark.slow
def test_outage_figures():
    scenario = load_builtin("outage")
    doc = run(scenario, ["ours"])
    inf2 = scenario.pools[scenario.pool_index("inf2")]
    bound = scenario.control_interval_s + inf2.provision_s
    assert doc["policies"]["ours"]["recovery_s"][0] <= bound
    # The Deployment watch runs the loop 5 s after the loss, not at the next tick.
    assert doc["policies"]["ours"]["slo_attainment"] >= 0.99


@pytest.mark.slow
def test_scale_runs_within_a_minute():
    started = time.perf_counter()
    doc = run(scale_scenario(), ["ours"])
    assert doc["requests"] >= 1_000_000
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_spot_interruption_figures():
    # The first interruption turns on the hedge for inf2's domain: the next two cost nothing.
    doc = run(load_builtin("spot-interruption"), ["ours", "static-mixed", "spothedge"])
    ours = doc["policies"]["ours"]
    assert ours["slo_attainment"] >= 0.99
    assert ours["recovery_s"][1:] == [0.0, 0.0]
    for name in ("static-mixed", "spothedge"):
        assert ours["cost_usd"] < doc["policies"][name]["cost_usd"]
