"""Imports point one way, from the API down: no module of symattn_kernels or bench imports,
directly or through others, a module that imports it. Every import statement counts, also one
inside a function or under ``typing.TYPE_CHECKING``: a lazy import hides a circle, it does not
remove it. Read from the source with ``ast``, so nothing is imported to check it."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("symattn_kernels", "bench")


def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages under root."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported_modules(module: str, is_package: bool, node: ast.AST, files) -> list[str]:
    """The modules of `files` an import statement of `module` loads: for `from X import name`,
    X.name where that is a module, else X. Parent packages are left out: Python runs them
    first, but they are not what the statement asks for."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in files]
    if node.level:
        package = module.split(".")[: None if is_package else -1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module
    targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
    return [target for target in targets if target in files]


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports anywhere in its source."""
    files = module_files(root, packages)
    graph = {}
    for module, path in files.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            graph[module].update(_imported_modules(module, path.name == "__init__.py", node, files))
        graph[module].discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated last), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


def test_no_import_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 20, f"found only {sorted(graph)} under {ROOT}"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_checker_sees_deferred_imports(tmp_path):
    """The checker finds a circle closed by a TYPE_CHECKING import or a function-local relative one."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .api import run\n")
    (pkg / "api.py").write_text("from pkg import kernels\n\ndef run():\n    return kernels.go()\n")
    (pkg / "kernels.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.api import run\n\ndef go():\n    pass\n")
    (pkg / "shapes.py").write_text("def size():\n    from . import kernels\n    return kernels\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {"pkg": {"pkg.api"}, "pkg.api": {"pkg.kernels"}, "pkg.kernels": {"pkg.api"},
                     "pkg.shapes": {"pkg.kernels"}}
    assert set(find_cycle(graph)) == {"pkg.api", "pkg.kernels"}
    (pkg / "kernels.py").write_text("def go():\n    pass\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None

