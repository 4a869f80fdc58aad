"""The layering of ARCHITECTURE.md holds: imports only point down, no cycles between packages, no project
import inside a function body (cli.py's dispatch aside), and the library layers never import Lightning."""

import ast
from pathlib import Path

import pytest

from em_lightning.layers import LAYERS, LIGHTNING, NO_PEER_IMPORTS

PACKAGE = Path(__file__).resolve().parents[1] / "em_lightning"


def rank(module: str) -> float:
    """The layer of a module's top-level package (em_lightning/layers.py: the one source)."""
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYERS, f"{module}: package {top!r} has no layer in em_lightning/layers.py"
    return LAYERS[top]


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
        if rank(me) < LIGHTNING:
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


def sibling_imports(folder: Path, dotted: str) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import between two modules of the package ``dotted`` in ``folder``;
    the package's ``__init__`` (re-exports, shared helpers such as ``help_parser``) is neither."""
    modules = {f"{dotted}.{p.stem}" for p in folder.glob("*.py") if p.name != "__init__.py"}
    found = []
    for path in sorted(folder.glob("*.py")):
        me = f"{dotted}.{path.stem}"
        if me not in modules:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:  # "from pkg import mod" names a module too
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += [(me, n, node.lineno) for n in names if n in modules and n != me]
    return found


@pytest.mark.parametrize("package", NO_PEER_IMPORTS)
def test_no_imports_between_callbacks_or_between_commands(package):
    """Callbacks hear from each other through events.py; commands share code through lower layers."""
    assert sibling_imports(PACKAGE / package, f"em_lightning.{package}") == []


def test_the_sibling_check_sees_both_import_forms(tmp_path):
    (tmp_path / "__init__.py").write_text("from pkg.a import A\n")  # the package's own re-export: allowed
    (tmp_path / "a.py").write_text("import os\nfrom pkg.b import B\n")
    (tmp_path / "b.py").write_text("from pkg import c\n")
    (tmp_path / "c.py").write_text("from pkg import helper\n")  # a name of __init__, not a module
    assert sibling_imports(tmp_path, "pkg") == [("pkg.a", "pkg.b", 2), ("pkg.b", "pkg.c", 1)]


def test_every_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in FILES}
    tops = {"" if t == "__init__" else t for t in tops}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))
