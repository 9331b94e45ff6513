"""`stepfleet bench stream` (issue 16) in a tiny configuration: it runs end to end and reports its figures."""

from __future__ import annotations

import json

from stepfleet.serving.bench import cli
from stepfleet.serving.bench.stream_bench import StepTimer, StreamBenchConfig, run, summary


def test_a_tiny_stream_bench_reports_first_partials_and_the_loop_overhead():
    cfg = StreamBenchConfig(size=64, steps=6, requests=3, partial_images=2, load=0.5)
    result = run(cfg, quick=True, log=lambda _: None)
    (streamed,), (plain,) = result["runs"]["streamed"], result["runs"]["plain"]
    assert streamed["partials_seen"] == 3  # every streamed request showed a partial image
    ratios = streamed["first_partial_over_final"]
    assert 0 < ratios["median"] < 1 and ratios["max"] < 1  # the partial came before the final image
    assert streamed["image_steps"] == plain["image_steps"] == 3 * 6  # the same trace, step for step
    assert streamed["render_s"] > 0 and "render_s" not in plain
    assert result["loop_overhead_ratio"] > 0 and 0 < result["render_share_of_loop"] < 1
    assert "first/final median" in summary(result) and json.dumps(result)


def test_the_step_timer_sums_what_the_engine_reports():
    t = StepTimer()
    t.on_step(0.5, 2, 0)
    t.on_step(0.25, 1, 3)
    assert (t.seconds, t.image_steps, t.steps) == (0.75, 3, 2)


def test_the_bench_cli_knows_stream(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["stream", "--help"])
    assert "--partial-images" in capsys.readouterr().out
