"""No import cycle inside ``kernels/`` (``imf_kernels``), function-level imports included.

The graph is read from the source (every ``from . import x`` / ``from .x import y``, at any depth of a
module, so an import deferred into a function to dodge a cycle counts too) and must be acyclic: each
module can then be imported first, alone, and its place in the layering is readable from its imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The sibling modules ``path`` imports (relative imports of the package, at any depth; the kernels
    import each other only relatively)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            found.update(n for n in names if n in modules)
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in KERNELS.glob("*.py")}
    return {m: package_imports(KERNELS / f"{m}.py", modules) for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_kernels_have_no_import_cycle():
    graph = import_graph()
    assert {"_tuning", "attention_common"} <= graph["attention_op"], graph["attention_op"]  # imports are seen
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in kernels/: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_deferred_import(tmp_path):
    """A cycle closed by an import inside a function (the shape the backward dispatch once had)."""
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    modules = {"a", "b", "c"}
    graph = {m: package_imports(tmp_path / f"{m}.py", modules) for m in sorted(modules)}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
