"""The layout of training/ (training/README.md): rooms by role with one-way arrows, no private helper imported
across modules, no function over 100 lines. (No import cycle anywhere: tests/scripts/test_check_import_cycles.py.)"""

from __future__ import annotations

import ast

import pytest

from tests.layout import REPO, import_graph, long_functions, source_files

# Room -> the rooms it may import (training/README.md draws the same arrows). Top-level modules are rooms of their own.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "layers": set(),
    "adapters": set(),
    "distill": set(),
    "data": {"config"},
    "checkpoint_format": {"config"},
    "models": {"layers", "adapters", "distill"},
    "weights": {"layers", "models"},
    "builders": {"config", "data", "checkpoint_format", "layers", "adapters", "distill", "models", "weights"},
    "checkpoint": {"config", "checkpoint_format", "adapters", "models", "builders"},
    "eval": {"config", "data", "models", "checkpoint"},
    "engine": {"config", "data", "adapters", "distill", "models", "builders", "checkpoint", "eval"},
    "jobs": {"config", "data", "models", "builders", "checkpoint", "eval", "engine"},
    "temporal": {"config", "data", "models", "checkpoint"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_rooms_import_one_way(graph: dict[str, set[str]]):
    wrong = []
    for module, targets in graph.items():
        if not module.startswith("training."):
            continue
        room = _room(module)
        assert room in ALLOWED, f"{module}: room {room!r} is not in training/README.md (add it there and here)"
        for target in targets:
            other = _room(target) if target.startswith("training.") else None
            if other is not None and other != room and other not in ALLOWED[room]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_service_imports_neither_training_nor_export(graph: dict[str, set[str]]):
    reached = {t for m, ts in graph.items() if m.startswith("service") for t in ts}
    assert not [t for t in reached if t.startswith(("training", "export"))]


def test_no_module_imports_the_private_names_of_another():
    wrong = []
    for path in source_files(("training", "export")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("training"):
                wrong += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names if a.name[0] == "_"]
    assert wrong == []


def test_no_function_in_training_is_over_100_lines():
    assert long_functions(REPO / "training", 100) == []


def test_the_length_check_flags_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(101))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "table.py").write_text(
        "def g():\n    return {\n" + "".join(f"    {i}: {i},\n" for i in range(120)) + "}\n"
    )
    found = [name.rsplit(":", 1)[1] for name, _ in long_functions(tmp_path, 100, relative_to=tmp_path)]
    assert found == ["f"]
