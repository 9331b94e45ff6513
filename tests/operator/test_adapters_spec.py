"""Issue 13 on the operator's side: `spec.adapters[]` is rendered into every worker's command
(`--adapters`), which the worker parses back; bad entries are refused at admission."""

from __future__ import annotations

import pytest
from k8s_helpers import example

from stepfleet.operator.children import workers
from stepfleet.operator.validation import validate
from stepfleet.serving.adapters.spec import AdapterSpecEntry, parse_adapters, render_adapters
from stepfleet.serving.settings import InvalidSettings, WorkerSettings


def _spec(adapters=None, model_source=None):
    obj = example("three-pool-fleet.yaml")
    if adapters is not None:
        obj["spec"]["adapters"] = adapters
    if model_source is not None:
        obj["spec"]["model"]["source"] = model_source
    return validate(obj["metadata"]["name"], obj["spec"])


def test_adapters_reach_every_workers_command():
    spec, problems = _spec([{"name": "style", "source": "hf://org/style-lora", "preload": True},
                            {"name": "logo", "source": "pvc://weights/loras/logo.safetensors"}],
                           model_source="pvc://weights/sd15")
    assert not problems, problems
    for pool in spec.pools:
        settings = WorkerSettings.from_argv(workers.worker_command(spec, pool)[2:])
        assert parse_adapters(settings.adapters) == [
            AdapterSpecEntry("style", "hf://org/style-lora", preload=True),
            AdapterSpecEntry("logo", "/models/loras/logo.safetensors")]


def test_no_adapters_means_no_flag():
    spec, problems = _spec()
    assert not problems
    assert not any(a.startswith("--adapters") for a in workers.worker_command(spec, spec.pools[0]))


@pytest.mark.parametrize("adapters", [
    [{"name": "a", "source": "s3://bucket/lora"}],
    [{"name": "a", "source": "hf://org/x"}, {"name": "a", "source": "hf://org/y"}],
    [{"name": "a", "source": "pvc://other-claim/lora.safetensors"}],  # not the model's claim
    [{"name": "bad name", "source": "hf://org/x"}],
])
def test_bad_adapters_are_refused(adapters):
    _, problems = _spec(adapters)
    assert problems


def test_the_flag_round_trips_and_refuses_malformed_entries():
    entries = [AdapterSpecEntry("a", "hf://o/r/f.safetensors", True), AdapterSpecEntry("b", "/x/y")]
    text = render_adapters(entries)
    assert text == "*a=hf://o/r/f.safetensors,b=/x/y" and parse_adapters(text) == entries
    assert render_adapters([]) is None and parse_adapters(None) == []
    for bad in ("a", "=x", "a=x,a=y", "bad name=x"):
        with pytest.raises(InvalidSettings):
            WorkerSettings.from_argv(["--adapters", bad])
