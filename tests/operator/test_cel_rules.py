"""The CRD's CEL rules, evaluated with a real CEL implementation (cel-python) on example objects.

No API server runs here, so this is how we know each `x-kubernetes-validations` rule
compiles and accepts the examples while rejecting what it is meant to reject.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import celpy
import pytest
from k8s_helpers import crd_schema, example

ENV = celpy.Environment()


def _rules(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, rule, self) for every rule that applies to a value present in the object."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], value
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                yield from _rules(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _rules(schema["items"], item, f"{path}[{i}]")


def _failures(obj: dict[str, Any]) -> list[str]:
    failed = []
    for path, rule, value in _rules(crd_schema(), obj):
        program = ENV.program(ENV.compile(rule))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, celpy.CELEvalError) or not bool(result):
            failed.append(f"{path}: {rule}")
    return failed


@pytest.mark.parametrize("name", ["three-pool-fleet.yaml", "cpu-fleet.yaml"])
def test_examples_pass_every_rule(name):
    assert len(list(_rules(crd_schema(), example(name)))) > 10
    assert _failures(example(name)) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s["pools"][1].update(name="l4"), "exists_one"),
        (lambda s: s["pools"][0].update(minReplicas=9, maxReplicas=2), "minReplicas <= self.maxReplicas"),
        (lambda s: s["pools"][2]["accelerator"].pop("topology"), "has(self.topology)"),
        (lambda s: s["pools"][0]["accelerator"].pop("model"), "has(self.model)"),
        (lambda s: s["pools"][2].update(nodePool={}), "!has(self.nodePool)"),
        (lambda s: s["pools"][0].update(name="router"), "self.name != 'router'"),
        (lambda s: s["pools"][0].pop("pricePerHour"), "has(p.pricePerHour)"),
        (lambda s: s["pools"][0]["accelerator"].update(type="cpu", count=1), "self.count == 0"),
    ],
)
def test_rule_rejects(mutate, expected):
    obj = example("three-pool-fleet.yaml")
    mutate(obj["spec"])
    failures = _failures(obj)
    assert any(expected in f for f in failures), failures
