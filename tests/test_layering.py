"""Import boundaries of DESIGN.md, checked on the source (import-linter's graph builder cannot
follow our `package-dir` mapping, so the same contract is enforced by reading the AST).

- the data plane (`serving/`) never imports the control plane (`stepfleet.operator`);
- pure logic imports no torch, HTTP framework or Kubernetes client, so it stays testable
  and simulable without them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "fastapi", "starlette", "uvicorn", "kopf", "kubernetes", "httpx")
PURE_SERVING = [
    "planner.py",
    "costmodel.py",
    "params.py",
    "bench/trace.py",
    "bench/replay.py",
    "bench/router_sim.py",
    "router/balancing.py",
    "router/costing.py",
]
PURE_OPERATOR = ["loop/observe.py"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_serving_never_imports_operator():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("stepfleet.operator"))
        for p in (ROOT / "serving").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("module", PURE_SERVING)
def test_pure_serving_modules_import_nothing_heavy(module):
    mods = imported_modules(ROOT / "serving" / module)
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert heavy == [], f"{module} must stay pure"


@pytest.mark.parametrize("module", PURE_OPERATOR)
def test_pure_operator_modules_import_nothing_heavy(module):
    mods = imported_modules(ROOT / "operator" / module)
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert heavy == [], f"{module} must stay pure"
