#!/usr/bin/env python3
"""Import cycles among the first-party modules, found statically with `ast` (nothing is imported or executed).

Every import statement counts, wherever it is: module level, inside functions (lazy imports still form a cycle
the moment both functions run), under `if TYPE_CHECKING:` (a cycle type checkers and readers must untangle),
in `try:` blocks; also `importlib.import_module("literal")`. Relative imports are resolved against the importing
module's package.

What an import is an edge to:
- `import a.b.c` and `from a.b.c import name` go to `a.b.c`, unless `name` is itself a submodule (`a/b/c/name.py`
  or `a/b/c/name/__init__.py`): then the edge goes to `a.b.c.name`. A module name that does not exist (a broken
  or generated module) goes to its longest prefix that does, unless that is a package containing the importer.
  `from a import name` inside package `a` is an edge to `a`: it reads `name` from a/__init__.py, which must have
  got that far (the classic "partially initialized module" error when it has not).
- A package is its `__init__.py`: an edge to `training.layers` is an edge to `training/layers/__init__.py`, so
  re-exports in an `__init__` are ordinary edges from the package to its submodules.
- Python also runs the `__init__` of every package on the way (`a`, then `a.b`). Those count as edges too, except
  for packages that contain the importing module: they have been initialised (or are initialising) before that
  module ran, so importing through them runs nothing. Hence `training.layers.lora` importing
  `training.layers.mlp` is no edge to `training.layers`, while `endostream.commands.train` importing
  `training.trainer` is an edge to `training` as well (training/__init__.py runs first).

Each strongly connected component with more than one module, and each module importing itself, is a cycle. It is
printed as chains `a -> b -> a` that together cover every import edge inside the component, each edge with the
file:line of its import statement(s). Exit status: 0 without cycles, 1 with cycles, 2 for a bad argument or a file
that does not parse.

    python scripts/check_import_cycles.py [ROOT] [--package NAME ...]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# the repository's first-party top-level packages; scripts/ and tests/ are named by path like the others
FIRST_PARTY = ("endostream", "export", "scripts", "service", "tests", "training")
SKIP_DIRS = {"__pycache__", "node_modules"}

Context = Literal["module", "function", "TYPE_CHECKING"]


@dataclass(frozen=True)
class Site:
    """One import statement behind an edge."""

    path: str  # relative to the root
    line: int
    context: Context

    def __str__(self) -> str:
        where = "" if self.context == "module" else f" ({self.context})"
        return f"{self.path}:{self.line}{where}"


@dataclass
class Graph:
    """Module name -> imported module name -> the statements that import it."""

    files: dict[str, Path]
    edges: dict[str, dict[str, list[Site]]] = field(default_factory=dict)

    def add(self, source: str, target: str, site: Site) -> None:
        sites = self.edges.setdefault(source, {}).setdefault(target, [])
        if site not in sites:  # `from a import b, c` names one module twice when b and c are attributes
            sites.append(site)

    def targets(self, module: str) -> Iterable[str]:
        return self.edges.get(module, {}).keys()


@dataclass(frozen=True)
class Cycle:
    """One strongly connected component and the chains that cover its edges."""

    modules: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]  # each starts and ends with the same module


# ------------------------------------------------------------------------------------------------------ modules
def discover(root: Path, packages: Sequence[str]) -> dict[str, Path]:
    """Module name -> file, for every .py below the given top-level folders of `root`."""
    files: dict[str, Path] = {}
    for package in packages:
        folder = root / package
        if not folder.is_dir():
            raise ValueError(f"package folder {folder} does not exist: pass existing --package names")
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _ancestors(module: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in `module` starts from: the module itself for an `__init__.py`."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


# ------------------------------------------------------------------------------------------------------ imports
class _ImportCollector(ast.NodeVisitor):
    """(imported name, `from` names or None, level, line, context) for every import in one file."""

    def __init__(self) -> None:
        self.found: list[tuple[str, list[str] | None, int, int, Context]] = []
        self._functions = 0
        self._type_checking = 0

    def _context(self) -> Context:
        if self._type_checking:
            return "TYPE_CHECKING"
        return "function" if self._functions else "module"

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self.visit(test)
            self._type_checking += 1
            for child in node.body:
                self.visit(child)
            self._type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, 0, node.lineno, self._context()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = [alias.name for alias in node.names]
        self.found.append((node.module or "", names, node.level, node.lineno, self._context()))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self.found.append((node.args[0].value, None, 0, node.lineno, self._context()))
        self.generic_visit(node)


def _resolve(name: str, files: dict[str, Path], own_packages: set[str]) -> str | None:
    """`name` when it is a first-party module; else (a broken or generated import) its longest prefix that is one,
    except a package containing the importer (importing through it runs nothing); None for third-party names."""
    if name in files:
        return name
    parts = name.split(".")[:-1]
    while parts:
        candidate = ".".join(parts)
        if candidate in files:
            return None if candidate in own_packages else candidate
        parts.pop()
    return None


def _targets(
    module: str,
    path: Path,
    name: str,
    names: list[str] | None,
    level: int,
    files: dict[str, Path],
    own_packages: set[str],
) -> Iterator[str]:
    """The first-party modules one import statement in `module` names."""
    if level:
        base = _package_of(module, path).split(".")
        if level - 1 >= len(base):
            return  # beyond the top-level package: Python raises ImportError; nothing of ours
        base = base[: len(base) - (level - 1)]
        name = ".".join([*base, name] if name else base)
    if names is None:
        resolved = _resolve(name, files, own_packages)
        if resolved:
            yield resolved
        return
    for imported in names:
        submodule = f"{name}.{imported}"
        resolved = submodule if submodule in files else _resolve(name, files, own_packages)
        if resolved:
            yield resolved


def build_graph(root: Path, packages: Sequence[str] = FIRST_PARTY) -> Graph:
    """The import graph of every module below `root`'s `packages`."""
    files = discover(root, packages)
    graph = Graph(files)
    for module, path in files.items():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as err:
            problem = f"{path}:{err.lineno}: does not parse ({err.msg})"
            raise ValueError(f"{problem}; fix the file to check import cycles") from None
        collector = _ImportCollector()
        collector.visit(tree)
        own_packages = set(_ancestors(module)) | ({module} if path.name == "__init__.py" else set())
        for name, names, level, line, context in collector.found:
            site = Site(path.relative_to(root).as_posix(), line, context)
            for target in _targets(module, path, name, names, level, files, own_packages):
                # the __init__ of each package on the way runs too, unless it contains (so already ran for) us
                for package in _ancestors(target):
                    if package in files and package not in own_packages:
                        graph.add(module, package, site)
                graph.add(module, target, site)
    return graph


# ------------------------------------------------------------------------------------------------------- cycles
def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep import chains); components in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph.files):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.targets(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.targets(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_path(graph: Graph, start: str, goal: str, inside: set[str]) -> list[str]:
    """Breadth-first path start -> ... -> goal through `inside` (one exists: both lie in one component)."""
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for child in sorted(graph.targets(node)):
            if child in inside and child not in previous:
                previous[child] = node
                queue.append(child)
    path = [goal]
    while previous[path[-1]] is not None:
        path.append(previous[path[-1]])  # type: ignore[arg-type]
    return path[::-1]


def find_cycles(graph: Graph) -> list[Cycle]:
    """Every import cycle: one per strongly connected component, with chains covering each edge inside it."""
    cycles = []
    for component in strongly_connected(graph):
        members = set(component)
        inner = [(a, b) for a in component for b in sorted(graph.targets(a)) if b in members]
        if len(component) == 1 and not inner:
            continue
        covered: set[tuple[str, str]] = set()
        chains = []
        for a, b in inner:
            if (a, b) in covered:
                continue
            chain = [a, *_shortest_path(graph, b, a, members)] if a != b else [a, a]
            covered.update(zip(chain, chain[1:], strict=False))
            chains.append(tuple(chain))
        cycles.append(Cycle(tuple(component), tuple(chains)))
    return cycles


def format_cycles(graph: Graph, cycles: Sequence[Cycle]) -> str:
    lines = []
    for number, cycle in enumerate(cycles, 1):
        lines.append(f"cycle {number}: {len(cycle.modules)} module(s): {', '.join(cycle.modules)}")
        for chain in cycle.chains:
            lines.append("  " + " -> ".join(chain))
            for a, b in zip(chain, chain[1:], strict=False):
                sites = graph.edges[a][b]
                lines.append(f"      {a} -> {b}: {', '.join(str(s) for s in sites)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument(
        "--package",
        action="append",
        dest="packages",
        help=f"top-level folder to check, repeatable (default: those of {', '.join(FIRST_PARTY)} that exist)",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    packages = args.packages or [p for p in FIRST_PARTY if (root / p).is_dir()]
    try:
        graph = build_graph(root, packages)
    except ValueError as err:
        print(f"check_import_cycles: error: {err}", file=sys.stderr)
        return 2
    cycles = find_cycles(graph)
    edges = sum(len(targets) for targets in graph.edges.values())
    if cycles:
        print(format_cycles(graph, cycles))
    print(f"{len(graph.files)} modules, {edges} import edges, {len(cycles)} cycle(s)")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
