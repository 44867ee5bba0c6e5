"""Static views of the source tree for the layout tests: the import graph (scripts/check_import_cycles.py's, so the
tests and the CI script read imports the same way) and the length of every function."""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "export", "service", "endostream")
CYCLE_SCRIPT = REPO / "scripts" / "check_import_cycles.py"


def cycle_checker() -> ModuleType:
    """scripts/check_import_cycles.py as a module (by path: scripts/ is not a package)."""
    if (loaded := sys.modules.get("check_import_cycles")) is not None:
        return loaded
    spec = importlib.util.spec_from_file_location("check_import_cycles", CYCLE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def source_files(packages: tuple[str, ...] = PACKAGES) -> Iterator[Path]:
    for package in packages:
        yield from sorted((REPO / package).rglob("*.py"))


def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the repository modules it imports (anywhere in the file, package __init__s on the way included)."""
    graph = cycle_checker().build_graph(REPO, packages)
    return {module: set(graph.targets(module)) - {module} for module in graph.files}


def long_functions(root: Path, limit: int, *, relative_to: Path = REPO) -> list[tuple[str, int]]:
    """(path:function, lines) of every function or method under `root` longer than `limit` lines.

    A function whose body is one `return` of a literal (a data table) is exempt.
    """
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Dict | ast.List):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit:
                out.append((f"{path.relative_to(relative_to)}:{node.name}", lines))
    return out
