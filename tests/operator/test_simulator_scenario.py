"""Scenario files: the issue's example form, the built-ins, loads, and clear errors."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from pydantic import ValidationError
from sim_fixtures import scenario

from stepfleet.operator.simulator.load import peak_rate, rate_at
from stepfleet.operator.simulator.scale import scale_scenario
from stepfleet.operator.simulator.scenario import (
    CapacityShort,
    Interrupt,
    Outage,
    PriceChange,
    builtin_names,
    load_builtin,
    load_file,
)

EXAMPLE = textwrap.dedent("""\
    name: example
    seed: 7
    duration_s: 86400
    slo: {latency_s: 3.0, percentile: 0.95}
    control_interval_s: 60
    pools:
      - {name: inf2, price_per_hour: 0.7582, throughput_rps_per_replica: 1.75, latency_s: 0.67,
         provision_s: 600, min_replicas: 1, max_replicas: 200, initial_replicas: 4}
      - {name: a10g, price_per_hour: 1.006, throughput_rps_per_replica: 1.5, latency_s: 0.68,
         provision_s: 480, min_replicas: 1, max_replicas: 200, initial_replicas: 2}
    load: {kind: cosine, base_rps: 5, peak_rps: 120, period_s: 86400}
    events:
      - {at_s: 30000, kind: capacity_short, pool: inf2, duration_s: 7200}
      - {at_s: 50000, kind: price, pool: a10g, price_per_hour: 0.45}
      - {at_s: 60000, kind: outage, pool: a10g}
      - {at_s: 70000, kind: interrupt, pool: inf2, fraction: 0.5}
    """)


def test_the_issue_example_parses(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(EXAMPLE)
    sc = load_file(path)
    assert sc.name == "example" and sc.seed == 7 and sc.duration_s == 86400
    assert [p.name for p in sc.pools] == ["inf2", "a10g"]
    assert [type(e) for e in sc.events] == [CapacityShort, PriceChange, Outage, Interrupt]
    assert peak_rate(sc) == pytest.approx(120, abs=0.01)


def test_builtins_are_the_named_scenarios_on_the_paper_pools():
    assert builtin_names() == ["cheap-pool-lost", "diurnal", "hedge-price-flip", "outage", "price-change",
                               "shortage", "spot-interruption", "two-domains-lost"]
    for name in builtin_names():
        sc = load_builtin(name)
        assert sc.name == name
        assert [p.name for p in sc.pools] == ["inf2", "trn1", "a10g", "l4"]
    shortage = load_builtin("shortage").events[0]
    assert shortage.pool == "inf2" and shortage.duration_s == 7200
    with pytest.raises(KeyError, match="no built-in scenario"):
        load_builtin("nope")


def test_scale_scenario_is_ten_pools_of_a_thousand():
    sc = scale_scenario()
    assert len(sc.pools) == 10
    assert all(p.initial_replicas == 1000 for p in sc.pools)


@pytest.mark.parametrize("change, message", [
    ({"events": [{"at_s": 10, "kind": "outage", "pool": "zz"}]}, "unknown pool"),
    ({"events": [{"at_s": 9999, "kind": "outage", "pool": "a"}]}, "past duration_s"),
    ({"load": {"kind": "cosine", "base_rps": 1}}, "peak_rps"),
    ({"load": {"kind": "constant", "rps": 1, "typo": 2}}, "typo"),
    ({"surprise": 1}, "surprise"),
    ({"pools": [{"name": "a", "price_per_hour": 1, "throughput_rps_per_replica": 1,
                 "latency_s": 1, "min_replicas": 5, "max_replicas": 2}]}, "min_replicas"),
])
def test_mistakes_fail_naming_the_field(change, message):
    with pytest.raises(ValidationError, match=message):
        scenario(**change)


def test_load_kinds():
    times = np.array([0.0, 100.0, 250.0, 400.0])
    steps = scenario(load={"kind": "steps", "steps": [{"at_s": 0, "rps": 2},
                                                      {"at_s": 200, "rps": 8}]})
    assert rate_at(steps, times).tolist() == [2, 2, 8, 8]
    cosine = scenario(load={"kind": "cosine", "base_rps": 2, "peak_rps": 10, "period_s": 800})
    assert rate_at(cosine, times)[0] == pytest.approx(2) and rate_at(cosine, times)[3] == 10
    trace = scenario(load={"kind": "trace", "points": [[0, 0], [400, 40]], "scale": 0.5})
    assert rate_at(trace, times).tolist() == pytest.approx([0, 5, 12.5, 20])


def test_trace_file_resolves_next_to_the_scenario(tmp_path):
    (tmp_path / "rates.csv").write_text("time_s,rps\n0,1\n# a comment\n600,7\n")
    path = tmp_path / "trace.yaml"
    path.write_text(textwrap.dedent("""\
        name: trace
        duration_s: 600
        slo: {latency_s: 2}
        pools: [{name: a, price_per_hour: 1, throughput_rps_per_replica: 1, latency_s: 0.5}]
        load: {kind: trace, file: rates.csv}
        """))
    sc = load_file(path)
    assert rate_at(sc, np.array([300.0]))[0] == pytest.approx(4.0)
