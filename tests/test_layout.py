"""The package's shape: no import circles, no upward imports, presets inside the package.

Layers, bottom up: the library sub-packages (extractors, verification, descriptors, metrics,
formats, utils, export, ...) < ``config`` < the stage modules at the top level (extract,
shortlist, candidates, rerank, predict, evaluate, pipeline, ...) < ``tools``, ``service`` < ``cli``.
A module may import only from its own layer or below, and the import graph has no circle.
Imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "delf_pipeline"
TOP_LAYERS = {"config": 1, "cli": 4, "__main__": 4, "__init__": 0}
SUBPACKAGE_LAYERS = {"tools": 3, "testing": 3, "service": 3}


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
    head = name.split(".")[0]
    if "." in name or (head in SUBPACKAGE_LAYERS and head != name):
        return SUBPACKAGE_LAYERS.get(head, 0)
    if head in SUBPACKAGE_LAYERS:
        return SUBPACKAGE_LAYERS[head]
    if (PACKAGE / head).is_dir():
        return 0  # a library sub-package's __init__
    return TOP_LAYERS.get(head, 2)  # a stage module


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
    assert "formats.store" in graph["candidates"] or "utils.blocks" in graph["candidates"]


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer(target) > layer(name)]
    assert upward == []


@pytest.mark.parametrize("name, expected", [
    ("utils.artifacts", 0), ("formats.store", 0), ("config", 1), ("extract", 2), ("pipeline", 2),
    ("tools.report", 3), ("cli", 4),
])
def test_layers(name, expected):
    assert layer(name) == expected
