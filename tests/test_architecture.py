"""The layering of ARCHITECTURE.md holds: imports only point down, no cycles between packages, no project
import inside a function body (cli.py's dispatch aside), and the library layers never import Lightning."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "em_lightning"
LIGHTNING_LAYER = {"module", "data", "strategies", "callbacks", "events", "dashboard", "logger_compat", "eval_logging",
                   "eval_tags"}
LIBRARY_RANK = {"judges": 3.0, "phase": 3.0, "evaluation": 3.1, "probes": 3.2, "report": 3.2, "sweep": 3.3,
                "defenses": 3.3}


def rank(module: str) -> float:
    top = module.split(".")[1] if "." in module else ""
    if top == "cli":
        return 6
    if top == "commands":
        return 5
    if top in LIGHTNING_LAYER:
        return 4
    return LIBRARY_RANK.get(top, 2)  # everything else is the base layer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(target module, line, inside a function?) for every import of the file."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    here = module_name(path).split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if path.name == "__init__.py" else here[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno, id(node) in inside
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in inside


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = module_name(path)
    for target, line, in_function in imports(path):
        if target.startswith("em_lightning"):
            assert rank(target) <= rank(me), f"{path.name}:{line}: {me} (layer {rank(me)}) imports {target}"
            if me != "em_lightning.cli":
                assert not in_function, f"{path.name}:{line}: project import inside a function: {target}"
        if rank(me) < 4:
            assert not target.startswith(("lightning", "pytorch_lightning")), f"{path.name}:{line}: {target}"


def test_no_cycles_between_packages():
    edges: dict[str, set[str]] = {}
    for path in FILES:
        a = module_name(path).split(".")[1] if "." in module_name(path) else ""
        for target, _, _ in imports(path):
            if target.startswith("em_lightning.") and (b := target.split(".")[1]) != a:
                edges.setdefault(a, set()).add(b)
    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    assert not cycles, cycles
