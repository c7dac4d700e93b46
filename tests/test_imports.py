"""No import cycle anywhere in phi3tune: not at module level, not type-only, not lazy inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "phi3tune"


def _module_name(path: Path, pkg: Path) -> str:
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(name: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = name if is_pkg else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    mod = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
    return [mod, *(f"{mod}.{a.name}" for a in node.names)]  # "from . import x" may import submodule x


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Every phi3tune module -> the phi3tune modules it imports anywhere (top level, functions, TYPE_CHECKING).
    Importing ``a.b.c`` imports ``a.b`` first, unless the importer lives inside ``a.b``."""
    files = {_module_name(p, pkg): p for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(name, path.name == "__init__.py", node):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    mod = ".".join(parts[:i])
                    if mod in files and mod != name and not name.startswith(mod + "."):
                        edges.add(mod)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_in_phi3tune():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_check_sees_lazy_and_type_only_cycles(tmp_path):
    """Negative control: a cycle through a lazy import and one through TYPE_CHECKING are both found."""
    pkg = tmp_path / "phi3tune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    assert find_cycle(import_graph(pkg)) == ["phi3tune.a", "phi3tune.b", "phi3tune.a"]
    (pkg / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None
