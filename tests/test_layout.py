"""The tree is the architecture diagram: these checks keep it one.

* No import cycles among datagen's modules, counting imports inside functions too (a lazy
  import that closes a cycle is still a cycle a reader has to untangle). Importing
  ``a.b.c`` depends on ``a.b.c`` and runs ``a.b``'s ``__init__`` first, so it counts as an
  edge to both, except to a package the importer sits in (already running); a name taken
  from a package's ``__init__`` (``from a.b import f``) is an edge to it wherever it is.
* No module over ``MAX_LINES`` lines unless its docstring says why in a line that starts
  with ``Long:``.

Static (``ast``), so it imports nothing and takes well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "datagen"
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # ``from a.b import c``: the module a.b.c if there is one, else a name in a.b
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names]
            else:
                continue
            for target in targets:
                if not target or not target.startswith("datagen"):
                    continue
                if target != mod:
                    graph[mod].add(target)  # what it names, even its own package's __init__
                parent = target.rpartition(".")[0]
                while parent:  # the packages whose __init__ runs first, but its own
                    if parent != mod and not mod.startswith(parent + "."):
                        graph[mod].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_are_edges() -> None:
    graph = import_graph()
    # datagen/cli.py imports its verbs inside functions: still edges.
    assert "datagen.run" in graph["datagen.cli"]


def test_long_modules_say_why() -> None:
    long = []
    for mod, path in modules().items():
        text = path.read_text()
        n = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if n > MAX_LINES and not any(line.startswith("Long:") for line in doc.splitlines()):
            long.append(f"{mod} ({n} lines)")
    assert not long, f"over {MAX_LINES} lines with no 'Long:' line in the docstring: {', '.join(long)}"
