"""Shared helpers of the deployment tests: paths, tools, the rendered chart."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "stepfleet"
TOOLS_BIN = ROOT / ".tools" / "bin"


def find_tool(name: str) -> str:
    """Path of a tool: .tools/bin, then the venv's bin, then PATH; fail (CI) or skip when missing."""
    for candidate in (TOOLS_BIN / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found in {TOOLS_BIN}, the venv or PATH: run scripts/fetch-tools.sh (`make test` does)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)


FULL_VALUES = CHART / "ci" / "full-values.yaml"
RELEASE_NAMESPACE = "stepfleet-system"


def run(cmd: list[str], check: bool = True, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a tool; on failure, the assertion message carries its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def helm_template(helm: str, *args: str) -> list[dict]:
    """The chart rendered by the real helm, as a list of objects."""
    out = run([helm, "template", "sf", str(CHART), "--namespace", RELEASE_NAMESPACE, *args]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]
