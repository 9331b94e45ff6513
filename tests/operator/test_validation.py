"""Spec checks the schema cannot make, each naming the offending field."""

from __future__ import annotations

import pytest
from k8s_helpers import example

from stepfleet.operator.validation import parse_source, validate


def _problems(mutate, name="sd15"):
    obj = example("three-pool-fleet.yaml")
    mutate(obj["spec"])
    spec, problems = validate(name, obj["spec"])
    assert spec is None
    return {p.field: p.message for p in problems}


def test_examples_are_valid():
    for name in ("three-pool-fleet.yaml", "cpu-fleet.yaml"):
        obj = example(name)
        spec, problems = validate(obj["metadata"]["name"], obj["spec"])
        assert problems == [] and spec is not None


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda s: s["pools"][1]["accelerator"].update(type="amd-gpu"), "spec.pools[1].accelerator.type", "no device mapping"),
        (lambda s: s["model"].update(source="s3://bucket/sd"), "spec.model.source", "cannot be loaded"),
        (lambda s: s["model"].update(source="stable-diffusion"), "spec.model.source", "no scheme"),
        (lambda s: s["model"].update(source="builtin://huge-sd"), "spec.model.source", "unknown builtin"),
        (lambda s: s["model"].update(source="pvc://Bad_Claim/x"), "spec.model.source", "pvc://"),
        (lambda s: s["pools"][2].update(nodePool={}), "spec.pools[2].nodePool", "AWS-only"),
        (lambda s: s["pools"][2]["accelerator"].pop("topology"), "spec.pools[2].accelerator.topology", "required"),
        (lambda s: s["pools"][0]["accelerator"].pop("model"), "spec.pools[0].accelerator.model", "required"),
        (lambda s: (s["pools"][1]["accelerator"].update(model="inferentia9"), s["pools"][1]["nodePool"].pop("instanceTypes")), "spec.pools[1].accelerator.model", "Neuron chip"),
        (lambda s: s["pools"][1]["accelerator"].update(resourceName="nvidia.com/gpu"), "spec.pools[1].accelerator.resourceName", "not a device resource"),
        (lambda s: s["pools"][0].update(minReplicas=9), "spec.pools[0].minReplicas", "maxReplicas"),
        (lambda s: s["pools"][1].update(name="l4"), "spec.pools", "unique"),
        (lambda s: s["pools"][0].pop("pricePerHour"), "spec.pools[0].pricePerHour", "required"),
        (lambda s: s["pools"][0].update(pricePerHour=-1), "spec.pools[0].pricePerHour", "greater than or equal"),
        (lambda s: s.update(pools=[]), "spec.pools", "at least 1"),
        (lambda s: s["pools"][0].update(replicas=3), "spec.pools[0].replicas", "not permitted"),
        # a family no worker has a backbone for
        (lambda s: s["model"].update(family="sd4"), "spec.model.family", "'sd15', 'sd2', 'sdxl', 'sd3', 'flux' or 'wan'"),
    ],
)
def test_problem_names_the_field(mutate, field, words):
    problems = _problems(mutate)
    assert field in problems, problems
    assert words.lower() in problems[field].lower(), problems[field]


def test_names_that_would_break_child_names():
    assert "metadata.name" in _problems(lambda s: None, name="Not_A_DNS_Label")
    long = "a" * 50
    assert "spec.pools[1].name" in _problems(lambda s: s["pools"][1].update(name="inf2-" + "x" * 15), name=long)


def test_source_parsing():
    assert parse_source("hf://org/name").location == "org/name"
    pvc = parse_source("pvc://models/sd15/v1")
    assert (pvc.scheme, pvc.claim, pvc.location) == ("pvc", "models", "sd15/v1")
    assert parse_source("builtin://tiny-sd").location == "tiny-sd"
