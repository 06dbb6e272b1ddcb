"""The package's import structure: no module of argonne_ds imports (even lazily, inside a
function) one that imports it back, and the light entry points do not pull in torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import argonne_ds

PACKAGE = "argonne_ds"
ROOT = Path(argonne_ds.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name; a package's __init__.py is the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its source (top level, in
    functions, under TYPE_CHECKING): `import a.b.c` and `from a.b import c` both count a.b.c
    when it is a module, else a.b (`from argonne_ds.data import DataError`: the package's
    __init__); relative imports resolved against the module's package. The parent packages
    that any import initialises on the way are not counted: every submodule would otherwise
    form a cycle with a package __init__ that re-exports from it."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets.add(base_name)
            # `from pkg import sub`: sub may be a module; the package itself is imported too.
            targets.update(f"{base_name}.{alias.name}" for alias in node.names
                           if f"{base_name}.{alias.name}" in modules)
    edges = set()
    for name in targets:
        # The nearest enclosing module of the package (`import a.b.func` is not a thing, but
        # `from a.b import C` names a.b).
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != module:
            edges.add(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """For each strongly connected component of more than one module (Tarjan's algorithm): a
    cycle through it, as a path m0 -> m1 -> ... -> m0, and the whole component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_in(graph, comp), comp) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {comp}")


def test_graph_sees_lazy_and_package_imports() -> None:
    """The walker itself: a function-level import and `from argonne_ds.data import X` count."""
    graph = import_graph()
    assert "argonne_ds.data" in graph["argonne_ds.data.shards"]  # from ... import DataError
    assert "argonne_ds.data.stream" in graph["argonne_ds.data.loader"]  # inside a function
    assert "argonne_ds.data.encode_worker" in graph["argonne_ds.cli"]  # inside a function


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in argonne_ds (lazy imports count too):\n" + "\n".join(
        "  " + " -> ".join(path) + (f"  (the whole circle: {', '.join(sorted(comp))})"
                                    if len(comp) > len(path) - 1 else "")
        for path, comp in cycles)


@pytest.mark.parametrize("module", ["argonne_ds.data.cache", "argonne_ds.cli"])
def test_light_modules_do_not_import_torch(module: str) -> None:
    """`argonne-ds prepare` and the CLI's start stay fast: torch (~1 s) is not imported."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}, sys; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "False", f"importing {module} imports torch"
