"""The generated CRD: up to date, structurally sound, and accepting exactly the valid objects."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import pytest
import yaml
from k8s_helpers import CRD_PATH, crd_schema, example, openapi_to_jsonschema

from stepfleet.operator import crdgen

EXAMPLE_FILES = ["three-pool-fleet.yaml", "cpu-fleet.yaml", "compiled-neuron.yaml"]


def _validator() -> jsonschema.Draft202012Validator:
    schema = openapi_to_jsonschema(crd_schema())
    # metadata is validated by the API server itself, not by the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def test_committed_crd_matches_models():
    assert CRD_PATH.read_text() == crdgen.render(), "run `stepfleet crds`"


def test_check_flag_detects_stale_file(tmp_path):
    target = tmp_path / "crd.yaml"
    cmd = [sys.executable, "-m", "stepfleet.cli", "crds", "--output", str(target)]
    # cwd outside the repo: its operator/ directory must not shadow the standard library.
    run = lambda args: subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    assert run([*cmd, "--check"]).returncode == 1  # missing
    assert run(cmd).returncode == 0
    assert run([*cmd, "--check"]).returncode == 0
    target.write_text(target.read_text().replace("dfs", "dfz"))
    result = run([*cmd, "--check"])
    assert result.returncode == 1 and "out of date" in result.stderr


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            yield from _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """Every node has a type (or int-or-string); no JSON-Schema-only constructs survive."""
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "default"}
    for path, node in _walk(crd_schema()):
        assert not forbidden & set(node), (path, forbidden & set(node))
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, path


def test_crd_shape():
    crd = yaml.safe_load(CRD_PATH.read_text())
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "diffusionservices.stepfleet.io"
    assert spec["scope"] == "Namespaced" and spec["names"]["shortNames"] == ["dfs"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Mode", "Ready", "Cost/h", "Age"]
    rules = [r["rule"] for _, node in _walk(crd_schema()) for r in node.get("x-kubernetes-validations", [])]
    assert any("exists_one" in r for r in rules)  # unique pool names
    assert any("minReplicas <= self.maxReplicas" in r for r in rules)
    assert any("size(self.pools) >= 1" in r for r in rules)
    assert any("has(p.pricePerHour)" in r for r in rules)
    assert any("google-tpu" in r and "topology" in r for r in rules)
    pools = crd_schema()["properties"]["spec"]["properties"]["pools"]
    assert pools["minItems"] == 1 and "pricePerHour" in pools["items"]["required"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_validate_against_crd(name):
    _validator().validate(example(name))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda o: o["spec"].update(pools=[]), "pools"),
        (lambda o: o["spec"]["pools"][0].pop("pricePerHour"), "pricePerHour"),
        (lambda o: o["spec"]["pools"][0]["accelerator"].update(type="amd-gpu"), "type"),
        (lambda o: o["spec"]["pools"][0].update(minReplicas=-1), "minReplicas"),
        (lambda o: o["spec"]["pools"][0].update(name="Bad_Name"), "name"),
        (lambda o: o["spec"]["pools"][0].update(typo=1), "typo"),
        (lambda o: o["spec"]["slo"].update(latencySeconds=0), "latencySeconds"),
        (lambda o: o["spec"]["model"].update(family="pixart"), "family"),
    ],
)
def test_schema_rejects_invalid(mutate, field):
    obj = example("three-pool-fleet.yaml")
    mutate(obj)
    errors = list(_validator().iter_errors(obj))
    assert errors, "expected a schema error"
    assert any(field in (list(e.path) + [str(e.message)]).__str__() for e in errors)


@pytest.mark.parametrize("family", ["kandinsky", "pixart", "SD15", ""])
def test_admission_refuses_a_family_no_worker_serves(family):
    """`kubectl apply` of `family: pixart` fails at the API server, naming spec.model.family."""
    obj = example("cpu-fleet.yaml")
    obj["spec"]["model"]["family"] = family
    (error,) = _validator().iter_errors(obj)
    assert list(error.absolute_path) == ["spec", "model", "family"]
    from stepfleet.serving.backbones import FAMILIES

    assert error.validator == "enum" and error.validator_value == list(FAMILIES)
    assert {"sd15", "sd2", "sdxl", "sd3", "flux"} <= set(FAMILIES)
    assert repr(family) in error.message
