"""`stepfleet simulate` end to end on a small scenario file."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from sim_fixtures import POOL_A, POOL_B

from stepfleet.cli import main as stepfleet_main
from stepfleet.operator.simulator.cli import main

SMALL = {
    "name": "small", "seed": 4, "duration_s": 1800, "slo": {"latency_s": 2.0},
    "control_interval_s": 60,
    "pools": [dict(POOL_A, min_replicas=1, service_cv=0.1),
              dict(POOL_B, min_replicas=1, initial_replicas=1)],
    "load": {"kind": "cosine", "base_rps": 2, "peak_rps": 10, "period_s": 1800},
    "events": [{"at_s": 600, "kind": "capacity_short", "pool": "a", "duration_s": 400},
               {"at_s": 1300, "kind": "outage", "pool": "b"}],
}


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_json_has_the_documented_shape(small_file, capsys):
    assert main(["--scenario-file", str(small_file), "--policy", "all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["scenario"] == "small"
    assert set(doc) >= {"scenario", "policies", "cost_lower_bound_usd", "wall_s"}
    assert list(doc["policies"]) == ["ours", "static-cheapest", "static-mixed", "paper", "hpa", "spothedge"]
    for result in doc["policies"].values():
        assert set(result) >= {"slo_attainment", "cost_usd", "cost_per_1k_images", "dropped",
                               "recovery_s"}
        assert 0 <= result["slo_attainment"] <= 1
        assert len(result["recovery_s"]) == 2
        assert result["cost_usd"] >= doc["cost_lower_bound_usd"] * 0.9


def test_table_and_timeline(small_file, tmp_path, capsys):
    timeline = tmp_path / "ticks.csv"
    assert main(["--scenario-file", str(small_file), "--policy", "ours,paper",
                 "--timeline", str(timeline)]) == 0
    out = capsys.readouterr().out
    assert "cost lower bound" in out and "ours" in out and "paper" in out
    rows = list(csv.DictReader(timeline.open()))
    assert {r["policy"] for r in rows} == {"ours", "paper"}
    assert {"t_s", "mode", "desired_a", "ready_b", "weight_a"} <= set(rows[0])


def test_list_and_errors(small_file, tmp_path, capsys):
    assert main(["--list"]) == 0
    assert "shortage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--scenario-file", str(small_file), "--policy", "magic"])
    assert exit_.value.code == 2
    assert main(["--scenario-file", str(tmp_path / "missing.yaml")]) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**SMALL, "pools": []}))
    assert main(["--scenario-file", str(broken)]) == 1
    assert "pools" in capsys.readouterr().err


def test_registered_as_a_stepfleet_subcommand(small_file, capsys):
    assert stepfleet_main(["simulate", "--scenario-file", str(small_file), "--policy", "ours",
                           "--seed", "9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 9
