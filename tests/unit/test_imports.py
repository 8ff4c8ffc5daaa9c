"""The import graph of ``mmray`` has no circle, and nothing below the CLI imports ``mmray.cli``.

Built from the source with ``ast``: top-level imports and the ones inside functions (a circle hidden in a
function still ties the two modules together), without those under ``if TYPE_CHECKING:``. Importing a
module also runs its packages' ``__init__``, so ``from mmray.a.b import c`` is an edge to ``mmray.a`` too
(not from a module inside ``mmray.a``: that package is already being imported).
"""
from __future__ import annotations

import ast
from pathlib import Path

import mmray

ROOT = Path(mmray.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The mmray modules ``name`` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    targets = {t for t in found if t in modules}
    for t in list(targets):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = t.split(".")
        targets.update(".".join(parts[:i]) for i in range(2, len(parts)))
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    return {t for t in targets if t not in own_packages and t != "mmray"}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(graph, set(g)) for g in groups]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(group)


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "mmray.train.trainer" in graph["mmray.train.api"]  # imported inside train()
    assert "mmray.config.schema" in graph["mmray.config.loader"]


def test_cycle_finder_reports_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_nothing_below_the_cli_imports_it():
    up = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if not m.startswith("mmray.cli")
                for t in targets if t == "mmray.cli" or t.startswith("mmray.cli."))
    assert not up, "imports from the library up into mmray.cli:\n" + "\n".join(up)


def test_function_level_imports_below_the_cli_say_why():
    """Inside a function, ``from mmray...`` hides a dependency from the reader: only for a module that imports
    Ray (or something as heavy), with the reason on the line. The CLI's verbs load the library when they run,
    so ``mmray --help`` stays fast; that is said once, in ``mmray/cli/main.py``."""
    silent = []
    for name, path in _modules().items():
        if name.startswith("mmray.cli"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        lines = path.read_text().splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("mmray") \
                        and inner.lineno not in skip and "#" not in lines[inner.end_lineno - 1]:
                    silent.append(f"{path.relative_to(ROOT.parent)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not silent, "function-level imports without a reason:\n" + "\n".join(sorted(set(silent)))
