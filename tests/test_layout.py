"""The package's shape: no import circles, no upward imports, stage modules small and only
imported from above.

Layers, bottom up (:data:`LAYERS`): each sub-package and top-level helper is its own layer, the
stage modules (the jobs: read inputs, call the cores, write the artifact, their command) share
one, then the front ends (tools, service) and the command line. A module may import only from
its own layer or below, and the import graph has no circle; imports inside functions count too.
Cores (every layer below the stages) never import a stage module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "delf_pipeline"
#: Bottom up. A sub-package's modules (and its __init__) take its layer.
LAYERS = ("__init__", "utils", "config", "formats", "metrics", "extractors", "retrieval", "descriptors",
          "verification", "evidence", "search", "training", "budget", "STAGES", "tools", "service", "cli", "__main__")
#: The stage modules: the jobs, each with its command.
STAGES = ("extract", "shortlist", "rerank", "predict", "evaluate", "calibrate", "pipeline", "index", "query",
          "evaluate_revisitop", "train")
MAX_STAGE_LINES = 300


def module_names() -> dict[str, Path]:
    """dotted name (without ``delf_pipeline.``) -> file, for every module of the package."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that module ``name`` imports (relative or absolute, at any depth)."""
    is_package = path.name == "__init__.py"
    package_parts = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("delf_pipeline"):
                target = node.module.removeprefix("delf_pipeline").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import extract` names a module
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("delf_pipeline."):
                    found.add(alias.name.removeprefix("delf_pipeline."))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imported_modules(name, path, set(names)) for name, path in names.items()}


def layer(name: str) -> int:
    """The layer number of module ``name`` (dotted, without ``delf_pipeline.``)."""
    head = name.split(".")[0]
    if head in STAGES:
        return LAYERS.index("STAGES")
    if head not in LAYERS:
        raise AssertionError(f"{name} is in no layer: add {head!r} to LAYERS or STAGES in tests/test_layout.py")
    return LAYERS.index(head)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_is_read_from_relative_and_absolute_imports():
    graph = import_graph()
    assert "extract" in graph["pipeline"]  # `from . import extract, ...`
    assert "utils.artifacts" in graph["extract"]  # `from .utils.artifacts import ...`
    assert "formats.blocks" in graph["formats.candidates"]  # `from .blocks import ...`
    assert "extractors.models" in graph["extractors.build"]  # an import inside a function


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_every_module_has_a_layer():
    for name in import_graph():
        layer(name)


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer(target) > layer(name)]
    assert upward == []


def test_no_core_imports_a_stage_module():
    stages = LAYERS.index("STAGES")
    found = [f"{name} imports the stage module {target}" for name, targets in import_graph().items()
             for target in sorted(targets) if layer(name) < stages and target.split(".")[0] in STAGES]
    assert found == []


def test_stage_modules_are_short():
    long = {name: lines for name in STAGES
            if (lines := len((PACKAGE / f"{name}.py").read_text().splitlines())) > MAX_STAGE_LINES}
    assert long == {}, f"stage modules over {MAX_STAGE_LINES} lines: move their cores into a sub-package"


def test_a_planted_upward_import_is_found(tmp_path):
    """The checks see an in-function import of a stage module from a core."""
    core = tmp_path / "search.py"
    core.write_text("def f():\n    from ..shortlist import run\n")
    found = imported_modules("retrieval.search", core, {"shortlist", "retrieval.search"})
    assert found == {"shortlist"} and layer("shortlist") > layer("retrieval.search")


@pytest.mark.parametrize("name, expected", [
    ("utils.artifacts", "utils"), ("formats.store", "formats"), ("config", "config"), ("extract", "STAGES"),
    ("pipeline", "STAGES"), ("verification.verifier", "verification"), ("tools.report", "tools"), ("cli", "cli"),
])
def test_layers(name, expected):
    assert layer(name) == LAYERS.index(expected)
