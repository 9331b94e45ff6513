"""The Dockerfile: clean under hadolint, multi-stage, one build arg per accelerator, non-root."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import ROOT, run

DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean(hadolint):
    proc = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)], check=False)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_accelerator_build_arg_chooses_a_base_per_flavour():
    ins = _instructions()
    assert ("ARG", "ACCELERATOR=cpu") in ins
    stages = [args.split() for word, args in ins if word == "FROM"]
    names = {s[-1] for s in stages if len(s) == 3 and s[1].upper() == "AS"}
    assert {"base-cpu", "base-cuda", "base-neuron", "base-tpu", "build", "runtime"} <= names
    # The build and runtime stages both start from the chosen flavour's base.
    assert ["base-${ACCELERATOR}", "AS", "build"] in stages and ["base-${ACCELERATOR}", "AS", "runtime"] in stages


@pytest.mark.parametrize("flavour", ["cpu", "cuda", "neuron", "tpu"])
def test_each_flavour_sets_its_device(flavour):
    text = DOCKERFILE.read_text()
    stage = text.split(f"AS base-{flavour}\n", 1)[1].split("\nFROM ", 1)[0]
    device = {"cpu": "cpu", "cuda": "cuda", "neuron": "neuron", "tpu": "xla"}[flavour]
    assert f"STEPFLEET_DEVICE={device}" in stage
    assert "TORCH_PACKAGES=" in stage


def test_runtime_is_non_root_with_a_healthcheck_and_the_cli_entrypoint():
    ins = _instructions()
    runtime = ins[max(i for i, (w, a) in enumerate(ins) if w == "FROM"):]
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1] == "10001:10001"  # matches the pods' runAsUser
    assert any(w == "HEALTHCHECK" and "CMD" in a for w, a in runtime)
    assert ("ENTRYPOINT", '["stepfleet"]') in runtime
    assert any(w == "COPY" and a.startswith("--from=build") for w, a in runtime)


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!pyproject.toml" in lines
