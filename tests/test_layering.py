"""Import boundaries of DESIGN.md, checked on the source (import-linter's graph builder cannot
follow our `package-dir` mapping — `stepfleet.serving` is `serving/`, `stepfleet.operator` is
`operator/` — so the same contracts are enforced by reading the AST).

- the data plane (`serving/`) never imports the control plane (`stepfleet.operator`);
- pure logic imports no torch, HTTP framework or Kubernetes client, so it stays testable
  and simulable without them;
- the worker's rooms import downward only: the engine and its pure helpers know no
  backbone, edit or HTTP; edits know no HTTP; backbones know neither edits nor HTTP;
- no import cycles among `stepfleet.*` modules at import time (an import inside a function
  is how this code defers a heavy dependency on purpose, so only module-level ones count);
- no module imports another's private (`_name`) names: what is shared is public.

Imports under `if TYPE_CHECKING:` never run, so only the private-name rule counts them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Source directory -> the package it installs as (pyproject's `package-dir`).
PACKAGES = {"stepfleet": "stepfleet", "serving": "stepfleet.serving", "operator": "stepfleet.operator",
            "training": "stepfleet.training"}
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
    "settings.py",
    "coschedule.py",
    "bench/coserve_replay.py",
    "videos/spec.py",
    "videos/jobs.py",
    "compiled/buckets.py",
]
PURE_OPERATOR = ["loop/observe.py", "local/soak_load.py", "local/soak_verdict.py", "compilation.py"]


@dataclass(frozen=True)
class Import:
    """One import statement, resolved to absolute module names."""

    #: `X` of `import X` or `from X import ...` (relative imports resolved).
    module: str
    #: The names of `from X import a, b` (empty for `import X`).
    names: tuple[str, ...]
    line: int
    #: Runs when the module is imported (not inside a function or lambda).
    at_import: bool

    def targets(self) -> tuple[str, ...]:
        """Every module this may import: `X`, and `X.a` for names that may be submodules."""
        return (self.module, *(f"{self.module}.{n}" for n in self.names if n != "*"))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def source_files() -> tuple[Path, ...]:
    return tuple(sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py")))


@cache
def known_modules() -> dict[str, Path]:
    return {module_name(p): p for p in source_files()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(path: Path, type_checking: bool = False) -> tuple[Import, ...]:
    """Every import in `path` that can run; those under `if TYPE_CHECKING:` only if asked."""
    module, is_package = module_name(path), path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            visit_one(child, at_import)

    def visit_one(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, (), node.lineno, at_import) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names)
            found.append(Import(_resolve(node, module, is_package), names, node.lineno, at_import))
        elif isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            for other in node.orelse:
                visit_one(other, at_import)
        else:
            inside = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(node, at_import and not inside)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return tuple(found)


def imported_modules(path: Path) -> set[str]:
    """Modules `path` may import, anywhere in it (relative imports resolved)."""
    return {target for imp in imports_of(path) for target in imp.targets()}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# --- the data plane never imports the control plane; pure modules import nothing heavy ---------


def test_serving_never_imports_operator():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if _under(m, ("stepfleet.operator",)))
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


def test_the_worker_contract_loads_without_the_data_plane_stack():
    """The operator parses specs into `WorkerSettings` and families: none of that may pull in torch."""
    code = (
        "import sys\n"
        "import stepfleet.serving.settings, stepfleet.operator.models, stepfleet.operator.children.workers\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'diffusers', 'fastapi'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == ""


# --- the worker's rooms import downward -------------------------------------------------------


@dataclass(frozen=True)
class Direction:
    """Modules under `importers` (a module or a package and everything in it) never import `forbidden`."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]


_S = "stepfleet.serving"
DIRECTIONS = [
    Direction(
        "engine-knows-no-model-addon-or-http",
        (f"{_S}.engine", f"{_S}.planner", f"{_S}.costmodel", f"{_S}.contracts"),
        (f"{_S}.backbones", f"{_S}.edits", f"{_S}.http", "fastapi", "starlette"),
    ),
    Direction("edits-know-no-http", (f"{_S}.edits",), (f"{_S}.http", "fastapi", "starlette")),
    Direction("backbones-know-no-edits-or-http", (f"{_S}.backbones",), (f"{_S}.edits", f"{_S}.http")),
    Direction("serving-knows-no-operator", (_S,), ("stepfleet.operator",)),
    # Training stands on serving (tokenizer, loading, the edit bench); serving never needs it.
    Direction("serving-knows-no-training", (_S, "stepfleet.operator"), ("stepfleet.training",)),
]


@pytest.mark.parametrize("rule", DIRECTIONS, ids=lambda r: r.name)
def test_imports_point_downward(rule: Direction):
    files = {m: p for m, p in known_modules().items() if _under(m, rule.importers)}
    if not files:
        pytest.skip(f"no modules under {', '.join(rule.importers)} yet")
    offenders = sorted(
        f"{m}:{imp.line} imports {', '.join(hits)}"
        for m, path in files.items()
        for imp in imports_of(path)
        # `from fastapi import Request` hits both `fastapi` and `fastapi.Request`: name the first.
        if (hits := [t for t in imp.targets() if _under(t, rule.forbidden)][:1])
    )
    assert offenders == [], "\n".join(offenders)


# --- no cycles at import time -----------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    """module -> the `stepfleet` modules it imports when it is imported (module level only).

    `from pkg import sub` where `sub` is a module depends on `sub`, not on `pkg`'s
    `__init__` (Python finds a submodule even while its package is still initialising).
    """
    known = known_modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        edges: set[str] = set()
        for imp in imports_of(path):
            if not imp.at_import or not _under(imp.module, ("stepfleet",)):
                continue
            subs = {f"{imp.module}.{n}" for n in imp.names} & known.keys()
            if len(subs) < len(imp.names) or not imp.names:
                edges.add(imp.module)
            edges |= subs
        graph[module] = {e for e in edges if e in known and e != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path back to its start) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths: dict[str, list[str]] = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def test_no_import_cycles():
    cycles = [" -> ".join(c) for c in find_cycles(import_graph())]
    assert cycles == [], "import cycles at module level:\n" + "\n".join(cycles)


def test_the_cycle_finder_reports_the_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


# --- nobody imports another module's private names --------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> Iterator[str]:
    for module, path in known_modules().items():
        for imp in imports_of(path, type_checking=True):  # a private name is coupling, run or not
            for name in imp.names:
                if _private(name) and imp.module != module:
                    yield f"{module}:{imp.line} imports {name} from {imp.module}"


def test_no_private_names_are_imported_from_other_modules():
    offenders = sorted(private_imports())
    assert offenders == [], "make these public (or move them):\n" + "\n".join(offenders)


# --- the walker itself ------------------------------------------------------------------------


def test_the_walker_resolves_relative_imports_and_skips_type_checking(tmp_path, monkeypatch):
    pkg = tmp_path / "serving" / "edits"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import cache\n")
    (pkg / "http.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .cache import thing\n"
        "from .. import app\n"
        "if TYPE_CHECKING:\n"
        "    from stepfleet.serving.runner import Runner\n"
        "else:\n"
        "    import json\n"
        "def later():\n"
        "    from stepfleet.serving.engine import _helper\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    typed = {i.module for i in imports_of(pkg / "http.py", type_checking=True)}
    assert "stepfleet.serving.runner" in typed
    got = {(i.module, i.names, i.at_import) for i in imports_of(pkg / "http.py")}
    assert got == {
        ("typing", ("TYPE_CHECKING",), True),
        ("stepfleet.serving.edits.cache", ("thing",), True),
        ("stepfleet.serving", ("app",), True),
        ("json", (), True),
        ("stepfleet.serving.engine", ("_helper",), False),
    }
    assert {i.module for i in imports_of(pkg / "__init__.py")} == {"stepfleet.serving.edits"}
