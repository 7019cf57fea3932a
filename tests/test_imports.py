"""The import graph: no circle, and no import up the floors of the design.

Floors, bottom up: `assignment` and `pretrained` (import nothing of the project),
`configs`, `cm`, `evaluation`, then `experiments`, `bench` and `main`. Every import
counts, at module level or inside a function, so a lazy import cannot hide a circle.
Run it alone with `python -m pytest tests/test_imports.py`; `python
tests/test_imports.py` prints the graph's edges.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("assignment", "pretrained", "configs", "cm", "evaluation", "experiments", "bench")
FLOOR = {"assignment": 0, "pretrained": 0, "configs": 1, "cm": 2, "evaluation": 3,
         "experiments": 4, "bench": 4, "main": 5}
# Within cm: the data and network packages sit below the rest of cm.
CM_BASE = ("cm.data", "cm.nets", "cm.config_view")


def project_modules() -> dict[str, str]:
    """{module name: file path} of every project module."""
    found = {"main": os.path.join(ROOT, "main.py")}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3]
                parts = rel.split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(dirpath, name)
    return found


def imports_of(path: str, modules: dict[str, str], me: str) -> set[str]:
    """The project modules that the file at `path` (module `me`) imports, anywhere."""
    is_pkg = path.endswith("__init__.py")
    package = me if is_pkg else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [s for s in subs if s in modules] or [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # A module's own package's __init__ is how Python reaches its siblings.
            if name and name != me and not (me.startswith(name + ".")):
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules, m) for m, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def floor(module: str) -> int:
    return FLOOR[module.split(".")[0]]


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if floor(b) > floor(a)]
    for a, targets in edges.items():
        if a.startswith(CM_BASE):
            bad += [f"{a} -> {b}" for b in targets
                    if b.startswith("cm") and not b.startswith(CM_BASE)]
    return sorted(bad)


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_upward_import():
    assert upward_edges(graph()) == []


def test_assignment_and_pretrained_import_nothing_of_the_project():
    edges = graph()
    for m, targets in edges.items():
        if m.split(".")[0] in ("assignment", "pretrained"):
            assert all(t.split(".")[0] == m.split(".")[0] for t in targets), (m, targets)


def test_the_checks_can_fail():
    """A circle and an upward edge planted in a copy of the graph are found."""
    edges = {m: set(t) for m, t in graph().items()}
    edges["cm.data.sources"].add("cm.train")
    assert upward_edges(edges) == ["cm.data.sources -> cm.train"]
    edges["cm.train"].add("cm.data.sources")  # already true, closes nothing alone
    edges["cm.consistency"].add("cm.train_step")
    assert find_cycle(edges) is not None
    edges = {m: set(t) for m, t in graph().items()}
    edges["assignment"].add("cm.train")
    assert "assignment -> cm.train" in upward_edges(edges)


if __name__ == "__main__":
    for m, targets in sorted(graph().items()):
        print(m, "->", ", ".join(sorted(targets)) or "-", file=sys.stdout)
