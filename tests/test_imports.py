"""The package's modules import each other without a cycle, counting the imports inside functions
too (an import moved into a function to dodge a cycle is still the cycle): the errors every module
may need live in `iris_ref.errors`, which imports nothing of the package."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "iris_ref"


def imports_of(path: Path) -> set[str]:
    """The iris_ref modules a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "iris_ref" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").exists():
                found.add(parts[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) - {name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    """Negative control: an import inside a function still closes a cycle."""
    edges = graph()
    edges["errors"] = edges["errors"] | {"config"}  # as if errors.py imported config inside a function
    assert any({"config", "errors"} <= set(c) for c in cycles(edges))
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from iris_ref import config\n    from iris_ref.trainer import train\n")
    assert imports_of(module) == {"config", "trainer"}
