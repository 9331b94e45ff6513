"""docs/crd-reference.md: generated from the CRD schema, committed up to date, complete."""

from __future__ import annotations

import subprocess
import sys

from k8s_helpers import crd_schema

from stepfleet.operator import crddocs, crdgen


def _fields(node, path):
    """Every field path under `node` as the reference spells it (`a.b[]`, `a.b{}`)."""
    for key, value in (node.get("properties") or {}).items():
        child = f"{path}.{key}"
        yield child
        inner, suffix = value, ""
        while True:
            if inner.get("type") == "array" and isinstance(inner.get("items"), dict):
                inner, suffix = inner["items"], suffix + "[]"
            elif isinstance(inner.get("additionalProperties"), dict):
                inner, suffix = inner["additionalProperties"], suffix + "{}"
            else:
                break
        yield from _fields(inner, child + suffix)


def test_committed_reference_is_what_the_schema_generates():
    assert crddocs.DEFAULT_PATH.read_text() == crddocs.render(crdgen.build_crd()), "run `stepfleet crds`"


def test_every_field_has_a_row_with_its_type_and_description():
    text = crddocs.DEFAULT_PATH.read_text()
    rows = {line.split(" | ")[0].strip("| `"): line for line in text.splitlines() if line.startswith("| `")}
    schema = crd_schema()
    for top in ("spec", "status"):
        for path in _fields(schema["properties"][top], top):
            assert path in rows, f"{path} has no row"
    pools = rows["spec.pools[].pricePerHour"]
    assert " | number | yes | " in pools and "USD per hour" in pools and "≥ 0" in pools
    assert "`30`" in rows["spec.controlLoop.intervalSeconds"]  # defaults come from the models
    assert "one of `auto`, `cost`, `capacity`" in rows["spec.mode"]
    assert "pool names must be unique" in text  # the CEL rules, with their messages


def test_check_covers_the_reference(tmp_path):
    crd, docs = tmp_path / "crd.yaml", tmp_path / "ref.md"
    cmd = [sys.executable, "-m", "stepfleet.cli", "crds", "--output", str(crd), "--docs", str(docs)]
    run = lambda args: subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    assert run(cmd).returncode == 0 and docs.read_text() == crddocs.DEFAULT_PATH.read_text()
    assert run([*cmd, "--check"]).returncode == 0
    docs.write_text(docs.read_text().replace("USD per hour", "EUR per hour"))
    result = run([*cmd, "--check"])
    assert result.returncode == 1 and "ref.md is out of date" in result.stderr
