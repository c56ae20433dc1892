"""The package's layout is its architecture: imports point one way, down the floors below; no library module
imports the command line; files stay small. Read from the source with ``ast`` (lazy imports inside functions count)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "transformer_ln"

# floor of each subpackage (or top-level module): a module may import its own group and lower floors only
# (errors and atomic are leaf utilities; "top" is the command line and the package's public face)
FLOORS = {"errors": 0, "atomic": 0, "model": 1, "config": 2, "runs": 3, "interop": 3, "data": 4, "diagnostics": 4,
          "evaluation": 5, "training": 6, "recurrent": 7, "top": 8}


def group(module: str) -> str:
    name = module.split(".")[1] if "." in module else "top"
    return name if name in FLOORS else "top"


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ["transformer_ln", *path.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every transformer_ln module ``module`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("transformer_ln"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from . import sharding`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("transformer_ln"))
    known = modules()
    lost = {t for t in found if t not in known and t.rpartition(".")[0] not in known}
    assert not lost, f"{module} imports {sorted(lost)}, which do not exist"
    return {t for t in found if t in known and t != module}


def test_imports_point_down_the_floors():
    wrong = []
    for module, path in modules().items():
        here = group(module)
        for target in imports_of(module, path):
            there = group(target)
            if there != here and FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_library_module_imports_the_command_line():
    users = [m for m, p in modules().items() if "transformer_ln.cli" in imports_of(m, p)]
    assert users == [] or set(users) <= {"transformer_ln.train"}, users


def test_no_import_cycle_between_modules():
    graph = {m: imports_of(m, p) for m, p in modules().items()}
    graph = {m: {t for t in ts if not graph.get(t) is None and t != "transformer_ln"} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                # a package's __init__ re-exporting its own modules is not a cycle of ideas
                cycle = stack[stack.index(t):] + [t] if t in stack else [m, t]
                if not all(c == cycle[0] or c.startswith(cycle[0] + ".") for c in cycle):
                    pytest.fail(" -> ".join(cycle))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_library_files_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400


def test_the_trainer_class_reads_in_two_screens():
    tree = ast.parse((PKG / "training" / "trainer.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert cls.end_lineno - cls.lineno + 1 < 250
