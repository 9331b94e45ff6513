"""Decide whether a DiffusionService spec can be reconciled, and say which field is wrong.

Two layers: the pydantic models (the same rules the CRD schema and its CEL expressions
enforce, re-checked because an object can reach the operator without them) and semantic
checks no schema can express: an accelerator type with no device mapping, a model source
no worker could load, names that would produce invalid child names. Every problem names
the field (`spec.pools[1].accelerator.type`) so the Warning Event is actionable.

Pure: takes the object's dicts, returns a parsed spec or a list of problems.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from stepfleet.operator import accelerators, compilation, names
from stepfleet.operator.models import DiffusionServiceSpec

# The worker's own list of builtins (a torch-free import; operator may import serving).
from stepfleet.serving.builtin_models import BUILTIN_MODELS

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PVC = re.compile(r"^(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?P<path>(/[A-Za-z0-9._-]+)*)/?$")
#: Model-level validators report at the model's location; point at the field they are about.
_MODEL_RULE_FIELDS = {"minReplicas": ".minReplicas", "pool": ".pools", "rows": ".rows", "sizes": ".sizes"}
SOURCE_SCHEMES = ("hf://", "pvc://", "builtin://")


@dataclass(frozen=True)
class Problem:
    """One reason the spec cannot be reconciled."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class ModelSource:
    """A parsed `spec.model.source`."""

    scheme: str  # "hf" | "pvc" | "builtin"
    location: str  # repo id, builtin name, or path inside the claim
    claim: str | None = None


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_source(source: str) -> ModelSource | str:
    """Parse a model source; a string result is the reason it is unusable."""
    if source.startswith("hf://"):
        repo = source[len("hf://"):]
        if not _HF_REPO.match(repo):
            return f"'{source}' is not a Hugging Face repo id (hf://ORG/NAME)"
        return ModelSource("hf", repo)
    if source.startswith("pvc://"):
        match = _PVC.match(source[len("pvc://"):])
        if not match:
            return f"'{source}' is not pvc://CLAIM/PATH with a valid claim name"
        return ModelSource("pvc", match.group("path").strip("/"), claim=match.group("claim"))
    if source.startswith("builtin://"):
        name = source[len("builtin://"):]
        if name not in BUILTIN_MODELS:
            return f"unknown builtin model '{name}' (known: {', '.join(sorted(BUILTIN_MODELS))})"
        return ModelSource("builtin", name)
    scheme = source.split("://", 1)[0] if "://" in source else source
    return (
        f"'{scheme}' sources cannot be loaded by workers (no credentials or downloader in the pod); "
        f"use one of {', '.join(SOURCE_SCHEMES)}"
        if "://" in source
        else f"'{source}' has no scheme; use one of {', '.join(SOURCE_SCHEMES)}"
    )


def _accelerator_problems(index: int, pool: Mapping[str, Any]) -> list[Problem]:
    """Device-mapping checks, on the raw dict so they run even when pydantic rejects the type."""
    base = f"spec.pools[{index}].accelerator"
    acc = pool.get("accelerator") if isinstance(pool, Mapping) else None
    if not isinstance(acc, Mapping):
        return []  # pydantic reports the missing/ill-typed field
    kind = acc.get("type")
    mapping = accelerators.DEVICES.get(kind) if isinstance(kind, str) else None
    if mapping is None:
        known = ", ".join(sorted(accelerators.DEVICES))
        return [Problem(f"{base}.type", f"no device mapping for accelerator type {kind!r} (known: {known})")]
    problems: list[Problem] = []
    if kind != "cpu" and not acc.get("model"):
        problems.append(Problem(f"{base}.model", f"required for {kind}"))
    if kind == "google-tpu" and not acc.get("topology"):
        problems.append(Problem(f"{base}.topology", "required for google-tpu (e.g. 2x2)"))
    if kind == "google-tpu" and pool.get("nodePool") is not None:
        problems.append(Problem(f"spec.pools[{index}].nodePool", "Karpenter NodePools are AWS-only; TPU pools use GKE node pools"))
    count = acc.get("count")
    if kind == "cpu" and count not in (None, 0):
        problems.append(Problem(f"{base}.count", "cpu pools request no accelerator devices"))
    if kind != "cpu" and count == 0:
        problems.append(Problem(f"{base}.count", f"{kind} pools need count >= 1"))
    resource = acc.get("resourceName")
    if resource is not None and resource not in mapping.allowed_resource_names:
        allowed = ", ".join(sorted(mapping.allowed_resource_names)) or "none"
        problems.append(Problem(f"{base}.resourceName", f"{resource!r} is not a device resource of {kind} (allowed: {allowed})"))
    node_pool = pool.get("nodePool")
    if (
        kind == "aws-neuron"
        and isinstance(node_pool, Mapping)
        and not node_pool.get("instanceFamilies")
        and not node_pool.get("instanceTypes")
        and acc.get("model") not in mapping.families_by_model
    ):
        problems.append(
            Problem(
                f"{base}.model",
                f"unknown Neuron chip {acc.get('model')!r}: set nodePool.instanceFamilies "
                f"(known chips: {', '.join(sorted(mapping.families_by_model))})",
            )
        )
    return problems


def validate(name: str, spec: Mapping[str, Any] | None) -> tuple[DiffusionServiceSpec | None, list[Problem]]:
    """Parse and check a spec. Returns (spec, []) when usable, else (None, problems)."""
    problems: list[Problem] = []
    raw = dict(spec or {})
    if not _DNS_LABEL.match(name) or len(names.router(name)) > 63:
        problems.append(Problem("metadata.name", "must be a DNS label of at most 56 characters (child Services need it)"))
    pools = raw.get("pools")
    if isinstance(pools, list):
        for i, pool in enumerate(pools):
            problems += _accelerator_problems(i, pool)
            pool_name = pool.get("name") if isinstance(pool, Mapping) else None
            if isinstance(pool_name, str) and len(names.worker(name, pool_name)) > 63:
                problems.append(Problem(f"spec.pools[{i}].name", f"'{name}-{pool_name}' exceeds 63 characters"))
    try:
        parsed = DiffusionServiceSpec.model_validate(raw)
    except ValidationError as exc:
        seen = {p.field for p in problems}
        for err in exc.errors():
            words = err["msg"].removeprefix("Value error, ").split(" ", 1)
            field = _loc_to_field(err["loc"]) + _MODEL_RULE_FIELDS.get(words[0], "")
            # Pydantic's wording for a bad enum is redundant with our device-mapping message.
            if not any(field == s or field.startswith(s + ".") for s in seen):
                problems.append(Problem(field, err["msg"]))
        return None, problems
    source = parse_source(parsed.model.source)
    if isinstance(source, str):
        problems.append(Problem("spec.model.source", source))
    elif parsed.model.revision and source.scheme != "hf":
        problems.append(Problem("spec.model.revision", "only hf:// sources have revisions"))
    problems += [Problem(field, message) for field, message in compilation.bucket_problems(parsed)]
    return (None, problems) if problems else (parsed, [])
