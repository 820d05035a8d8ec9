"""The package's internal import graph: acyclic, and the house rules of the layout hold.

Every module of ``nara_diffusion`` is parsed with `ast` (nothing is imported); absolute and relative imports are
resolved, those inside functions included (a lazy import is still a dependency). ``from pkg import name`` counts as
an import of ``pkg.name`` when that is a module, else of ``pkg``. Importing ``a.b.c`` also runs ``a/__init__`` and
``a/b/__init__``, but those edges are left out: a package's ``__init__`` re-exporting its children is not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nara_diffusion"


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name → file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package, else None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            if name.split(".")[0] == PACKAGE and (resolved := _resolve(name, modules)) and resolved != module:
                targets.add(resolved)
    return targets


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = import_graph()


def test_the_graph_sees_the_package_and_its_lazy_imports():
    assert {"nara_diffusion.core.tuner", "nara_diffusion.text.sampler", "nara_diffusion.training.loop"} <= set(GRAPH)
    assert "nara_diffusion.core" in GRAPH["nara_diffusion"]  # `from .core import ...` in the package __init__
    assert "nara_diffusion.text.objectives" in GRAPH["nara_diffusion.text.denoiser"]


def test_the_parser_resolves_relative_function_level_and_from_package_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import sub\n")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..sub import b\n    from nara_diffusion import other\n")
    (pkg / "sub" / "b.py").write_text("from .a import f\n")
    (pkg / "other.py").write_text("import nara_diffusion.sub.b\n")
    graph = import_graph(tmp_path)
    assert graph["nara_diffusion"] == {"nara_diffusion.sub"}
    assert graph["nara_diffusion.sub"] == {"nara_diffusion.sub.a"}
    assert graph["nara_diffusion.sub.a"] == {"nara_diffusion.sub.b", "nara_diffusion.other"}
    assert graph["nara_diffusion.other"] == {"nara_diffusion.sub.b"}
    cycle = ["nara_diffusion.sub.a", "nara_diffusion.other", "nara_diffusion.sub.b", "nara_diffusion.sub.a"]
    assert find_cycle(graph) == cycle
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_the_package_has_no_import_cycle():
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


@pytest.mark.parametrize(
    ("area", "forbidden"),
    [("core", {"text", "image", "training", "selection", "toy"}), ("text", {"image"}), ("image", {"text"})],
)
def test_layers_import_only_downwards(area, forbidden):
    bad = sorted(
        f"{m} -> {t}" for m, targets in GRAPH.items() if _area(m) == area for t in targets if _area(t) in forbidden
    )
    assert not bad, f"{area}/ must not import {sorted(forbidden)}: {bad}"


def test_only_the_toy_package_imports_the_toy_worlds():
    assert any(_area(m) == "toy" for m in GRAPH), "nara_diffusion/toy/ is where the toy worlds live"
    bad = sorted(
        f"{m} -> {t}" for m, targets in GRAPH.items() if _area(m) != "toy" for t in targets if _area(t) == "toy"
    )
    assert not bad, f"the library must not import the toy worlds (examples and benchmarks may): {bad}"
