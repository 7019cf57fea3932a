"""The import graph: no circle, and no import up the floors of the design.

Floors, bottom up: `assignment` and `pretrained` (import nothing of the project),
`configs`, `cm`, `evaluation`, then `experiments`, `bench` and `main`. Inside `cm`:
`cm.runtime` (config views, checkpoints, workdir, logs, distributed...), then `cm.data`
and `cm.nets`, then the objectives, then the pieces of a step, then what builds a run,
then the modes. Every import counts, at module level or inside a function, so a lazy
import cannot hide a circle. Every top-level package must have a floor. The checks
first prove they see the graph (known edges, a parser test on a written file) and
that they can fail (planted edges). `python tests/test_imports.py` prints every edge.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_PACKAGES = {"tests", "docs", "runs", "workdirs"}  # folders that are not imported code
FLOOR = {"assignment": 0, "pretrained": 0, "configs": 1, "cm": 2, "evaluation": 3,
         "experiments": 4, "bench": 4, "main": 5}
# Inside cm, bottom up (a module takes the floor of its longest matching prefix).
CM_FLOOR = {
    "cm.runtime": 0,
    "cm.data": 1, "cm.nets": 1,
    "cm.schedules": 2, "cm.objectives": 2,
    "cm.optim": 3, "cm.pairing": 3, "cm.sampling": 3, "cm.train_step": 3, "cm.config": 3,
    "cm.latent": 3,
    "cm.setup": 4, "cm.init_from": 4,
    "cm.train": 5, "cm.sample_run": 5, "cm.start": 5, "cm.autoencoder_train": 5, "cm": 5,
}
# Edges the parser must find, or it is not reading the tree (a parser that returns no
# imports would pass every other check).
KNOWN_EDGES = [("main", "cm.start"), ("cm.train", "cm.train_step"),
               ("cm.objectives.ct", "cm.objectives.consistency"),
               ("cm.objectives", "cm.objectives.ddpm"), ("evaluation.run", "cm.setup"),
               ("cm.pairing", "assignment"), ("cm.runtime.views", "configs.base"),
               ("cm.start", "cm.train")]  # a lazy import, inside a function


def top_level_packages(root: str = ROOT) -> list[str]:
    """Folders at the project root that hold Python code (they need a floor)."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if (os.path.isdir(path) and not name.startswith(".") and name not in NOT_PACKAGES
                and any(f.endswith(".py") for f in os.listdir(path))):
            out.append(name)
    return out


def without_floor(root: str = ROOT) -> list[str]:
    return [p for p in top_level_packages(root) if p not in FLOOR]


def project_modules(root: str = ROOT) -> dict[str, str]:
    """{module name: file path} of every project module."""
    found = {"main": os.path.join(root, "main.py")}
    for pkg in top_level_packages(root):
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3]
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


def graph(root: str = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
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


def cm_floor(module: str) -> int:
    best = max((p for p in CM_FLOOR if module == p or module.startswith(p + ".")), key=len)
    return CM_FLOOR[best]


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
           if floor(b) > floor(a)]
    bad += [f"{a} -> {b}" for a, targets in edges.items() for b in targets
            if a.startswith("cm.") and b.startswith("cm") and cm_floor(b) > cm_floor(a)]
    return sorted(bad)


def test_the_parser_sees_known_edges_and_every_kind_of_import(tmp_path):
    edges = graph()
    missing = [f"{a} -> {b}" for a, b in KNOWN_EDGES if b not in edges.get(a, ())]
    assert not missing, missing
    # A written tree: absolute, from-, relative and lazy (in-function) imports.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("a", "b", "c", "d"):
        (pkg / f"{name}.py").write_text("")
    (pkg / "e.py").write_text("import pkg.a\nfrom pkg import b\nfrom . import c\n"
                              "def f():\n    from .d import thing\n")
    modules = {"pkg": str(pkg / "__init__.py"),
               **{f"pkg.{n}": str(pkg / f"{n}.py") for n in "abcde"}}
    assert imports_of(str(pkg / "e.py"), modules, "pkg.e") == {"pkg.a", "pkg.b", "pkg.c",
                                                               "pkg.d"}


def test_every_top_level_package_has_a_floor(tmp_path):
    assert without_floor() == []
    assert {"assignment", "cm", "evaluation", "configs"} <= set(top_level_packages())
    (tmp_path / "newpkg").mkdir()
    (tmp_path / "newpkg" / "x.py").write_text("")
    (tmp_path / "cm").mkdir()
    (tmp_path / "cm" / "y.py").write_text("")
    assert without_floor(str(tmp_path)) == ["newpkg"]  # a new folder of code is seen


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
    """A circle and upward edges planted in a copy of the graph are found."""
    edges = {m: set(t) for m, t in graph().items()}
    edges["cm.data.sources"].add("cm.train")
    edges["cm.runtime.checkpoints"].add("cm.objectives.ct")
    assert upward_edges(edges) == ["cm.data.sources -> cm.train",
                                   "cm.runtime.checkpoints -> cm.objectives.ct"]
    edges["cm.objectives.consistency"].add("cm.objectives.ct")  # ct imports consistency
    assert find_cycle(edges) is not None
    edges = {m: set(t) for m, t in graph().items()}
    edges["assignment"].add("cm.train")
    assert "assignment -> cm.train" in upward_edges(edges)


if __name__ == "__main__":
    for m, targets in sorted(graph().items()):
        print(m, "->", ", ".join(sorted(targets)) or "-", file=sys.stdout)
