"""No import circles in the package, counting the imports inside functions.

The graph is built from the source with ``ast``: one node per module of
``src/convexmix``, one edge per ``import`` / ``from ... import`` of another convexmix
module anywhere in the file (module level, functions, ``TYPE_CHECKING`` blocks aside).
``from package import name`` counts as an import of ``package.name`` where that is a
module, else of ``package`` (its ``__init__``, the package's face). The faces' own
imports count too, so a module that imports its package's face (``import convexmix``
for ``__version__``) while the face imports it is a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import convexmix

ROOT = Path(convexmix.__file__).parent
PACKAGE = "convexmix"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The convexmix modules that ``name`` (at ``path``) imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
    out.discard(name)
    return {t for t in out if t in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each with
    one circle through it spelled out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(graph, comp) for comp in comps]


def describe(found: list[list[str]], graph: dict[str, set[str]]) -> str:
    """One line per circle, with every module of its strongly connected component."""
    lines = []
    for circle in found:
        members = _component(graph, circle[0])
        extra = sorted(members - set(circle))
        tail = f"  (also in the knot: {', '.join(extra)})" if extra else ""
        lines.append("  " + " -> ".join(circle) + tail)
    return "\n".join(lines)


def _component(graph: dict[str, set[str]], start: str) -> set[str]:
    def reach(edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for w in edges.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    back: dict[str, set[str]] = {}
    for v, ws in graph.items():
        for w in ws:
            back.setdefault(w, set()).add(v)
    return reach(graph) & reach(back)


def _circle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One circle inside the component ``comp``, from its first module back to it."""
    members = set(comp)
    start = comp[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return comp  # pragma: no cover - a component always holds a circle


def test_the_cycle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_local_imports_count() -> None:
    graph = import_graph()
    assert "convexmix.functional._projection" in graph["convexmix.functional._sparse"]
    assert "convexmix.errors" in graph["convexmix._validation"]


def test_no_import_circles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, f"{len(found)} import circle(s) in src/convexmix:\n{describe(found, graph)}"


def test_no_import_circles_in_functional() -> None:
    graph = import_graph()
    sub = {
        k: {t for t in v if t.startswith("convexmix.functional.")}
        for k, v in graph.items()
        if k.startswith("convexmix.functional.")
    }
    found = cycles(sub)
    assert not found, f"import circle(s) in convexmix.functional:\n{describe(found, sub)}"
