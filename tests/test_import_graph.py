"""The package graph of care_scale has no cycle: read with ``ast``, nothing is imported.

A node is one subpackage or top-level module of ``care_scale`` (``inference``, ``export``,
``artifacts``, ...); an edge is any import of one from another, at module level or inside a
function (a lazy import is still a dependency: the package cannot be read or tested alone).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "care_scale"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names of the modules ``node`` imports (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parent = module.split(".") if is_package else module.split(".")[:-1]
        parent = parent[: len(parent) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
    if base == "care_scale":  # `from care_scale import storage`: the names are the modules
        return [f"care_scale.{alias.name}" for alias in node.names]
    return [base]


def package_graph() -> dict[tuple[str, str], list[str]]:
    """(from node, to node) -> the ``file:line`` places of those imports."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        parts = module.split(".")
        if len(parts) < 2:
            continue  # care_scale/__init__.py belongs to no node
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _imported(node, module, path.name == "__init__.py"):
                tparts = target.split(".")
                if tparts[0] != "care_scale" or len(tparts) < 2 or tparts[1] == parts[1]:
                    continue
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                edges.setdefault((parts[1], tparts[1]), []).append(where)
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_subpackages():
    edges = package_graph()
    assert ("embed", "export") in edges  # the reader sees the real tree (sanity)
    found = cycles(edges)
    detail = [f"{a} -> {b}: {', '.join(places[:3])}" for comp in found
              for (a, b), places in sorted(edges.items()) if a in comp and b in comp]
    assert not found, "import cycles between care_scale subpackages:\n" + "\n".join(detail)


def test_cycle_finder_sees_lazy_and_indirect_cycles():
    # Three nodes in a ring, one edge only inside a function: still one cycle.
    edges = {("a", "b"): ["x.py:1"], ("b", "c"): ["y.py:9 (in a function)"],
             ("c", "a"): ["z.py:2"], ("c", "d"): ["z.py:3"]}
    assert cycles(edges) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from care_scale.export import pipeline\n")
    names = [n for node in ast.walk(tree) for n in _imported(node, "care_scale.inference.kinds",
                                                             False)]
    assert names == ["care_scale.export"]
    assert _imported(ast.parse("from ..artifacts import MANIFEST").body[0],
                     "care_scale.inference.kinds", False) == ["care_scale.artifacts"]
