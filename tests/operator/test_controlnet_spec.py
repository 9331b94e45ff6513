"""Issue 14 on the operator's side: `spec.controlnets[]` and `serving.controlnetPlacement` (with a
pool's override) are rendered into every worker's command, which the worker parses back."""

from __future__ import annotations

import pytest
from k8s_helpers import example

from stepfleet.operator.children import workers
from stepfleet.operator.validation import validate
from stepfleet.serving.controlnet.spec import parse_registry
from stepfleet.serving.settings import WorkerSettings


def _spec(controlnets=None, serving=None, pool_override=None, model="builtin://tiny-sd"):
    obj = example("three-pool-fleet.yaml")
    obj["spec"]["model"] = {"source": model, "family": "sd15"}
    if controlnets is not None:
        obj["spec"]["controlnets"] = controlnets
    if serving is not None:
        obj["spec"].setdefault("serving", {}).update(serving)
    if pool_override is not None:
        obj["spec"]["pools"][0]["controlnetPlacement"] = pool_override
    return validate(obj["metadata"]["name"], obj["spec"])


def test_controlnets_and_placement_reach_every_workers_command():
    spec, problems = _spec([{"name": "edges", "source": "builtin://tiny-controlnet", "kind": "canny"},
                            {"name": "depth", "source": "hf://lllyasviel/sd-controlnet-depth", "kind": "depth"}],
                           {"controlnetPlacement": "overlap", "maxControlnets": 3}, pool_override="inline")
    assert not problems, problems
    placements = []
    for pool in spec.pools:
        argv = workers.worker_command(spec, pool)[2:]
        settings = WorkerSettings.from_argv(argv)
        assert [(e.name, e.source, e.kind) for e in parse_registry(settings.controlnets)] == [
            ("edges", "tiny-controlnet", "canny"), ("depth", "lllyasviel/sd-controlnet-depth", "depth")]
        assert settings.max_controlnets == 3
        placements.append(settings.controlnet_placement)
    assert placements[0] == "inline" and set(placements[1:]) == {"overlap"}


def test_no_controlnets_means_no_flag():
    spec, problems = _spec()
    assert not problems
    argv = workers.worker_command(spec, spec.pools[0])
    assert not any(a.startswith("--controlnet") for a in argv)


@pytest.mark.parametrize("controlnets", [
    [{"name": "a", "source": "s3://bucket/net"}],
    [{"name": "a", "source": "builtin://tiny-controlnet"}, {"name": "a", "source": "builtin://tiny-controlnet"}],
    [{"name": "a", "source": "builtin://tiny-controlnet", "kind": "sketchy"}],
    [{"name": "a", "source": "builtin://tiny-controlnet-sdxl"}],  # fits tiny-sdxl only
    [{"name": "a", "source": "builtin://huge-controlnet"}],
])
def test_bad_controlnets_are_refused(controlnets):
    _, problems = _spec(controlnets)
    assert problems


def test_a_builtin_controlnet_needs_its_builtin_model():
    _, problems = _spec([{"name": "a", "source": "builtin://tiny-controlnet"}],
                        model="hf://stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert any("fits only the model builtin://tiny-sd" in str(p) for p in problems), problems
