"""Shared helpers for the operator tests: example objects and schema checks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
CRD_PATH = ROOT / "crds" / "diffusionservices.stepfleet.io.yaml"


def example(name: str) -> dict[str, Any]:
    """A fresh copy of an example object from docs/examples."""
    return copy.deepcopy(yaml.safe_load((EXAMPLES / name).read_text()))


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema: boolean exclusive bounds and int-or-string."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
        elif exclusive in out:
            out.pop(exclusive)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and node is not None:
        # Structural schemas prune unknown fields; in a check, treat them as errors instead.
        out["additionalProperties"] = False
    return out
