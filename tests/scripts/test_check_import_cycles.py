"""scripts/check_import_cycles.py on synthetic packages written to tmp_path (one per kind of import that can close
a cycle, and an acyclic tree), and on the repository itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.layout import CYCLE_SCRIPT, REPO, cycle_checker

ROOT = REPO
SCRIPT = CYCLE_SCRIPT


cic = cycle_checker()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _cycles(root: Path, *packages: str) -> tuple[list, object]:
    graph = cic.build_graph(root, packages or ("pkg",))
    return cic.find_cycles(graph), graph


def _edges(cycle) -> set[tuple[str, str]]:
    return {pair for chain in cycle.chains for pair in zip(chain, chain[1:], strict=False)}


def test_function_level_cycle(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/trainer.py": "def train():\n    from pkg.stage import run\n    return run()\n",
            "pkg/stage.py": "import os\n\n\ndef run():\n    from pkg.trainer import train\n    return train\n",
        },
    )
    cycles, graph = _cycles(tmp_path)
    assert [c.modules for c in cycles] == [("pkg.stage", "pkg.trainer")]
    assert _edges(cycles[0]) == {("pkg.stage", "pkg.trainer"), ("pkg.trainer", "pkg.stage")}
    report = cic.format_cycles(graph, cycles)
    assert "pkg.stage -> pkg.trainer -> pkg.stage" in report
    assert "pkg/trainer.py:2 (function)" in report and "pkg/stage.py:5 (function)" in report


def test_type_checking_cycle(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/layer.py": "from pkg.variant import Variant\n",
            "pkg/variant.py": (
                "from __future__ import annotations\nimport typing\n\n"
                "if typing.TYPE_CHECKING:\n    from pkg.layer import Layer\nelse:\n    import json\n"
            ),
        },
    )
    cycles, graph = _cycles(tmp_path)
    assert [c.modules for c in cycles] == [("pkg.layer", "pkg.variant")]
    assert "pkg/variant.py:5 (TYPE_CHECKING)" in cic.format_cycles(graph, cycles)
    assert [s.context for s in graph.edges["pkg.layer"]["pkg.variant"]] == ["module"]


def test_relative_import_cycle(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/a.py": "from .b import B\n",
            "pkg/sub/b.py": "from ..top import T\n",
            "pkg/top.py": "from .sub.a import A\n",
        },
    )
    cycles, _ = _cycles(tmp_path)
    assert [c.modules for c in cycles] == [("pkg.sub.a", "pkg.sub.b", "pkg.top")]
    assert cycles[0].chains == (("pkg.sub.a", "pkg.sub.b", "pkg.top", "pkg.sub.a"),)


def test_from_package_import_submodule_cycle(tmp_path: Path) -> None:
    # `from pkg.models import heads` is an edge to pkg.models.heads, not only to pkg/models/__init__.py
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/models/__init__.py": "",
            "pkg/models/heads.py": "from pkg import registry\n",
            "pkg/registry.py": "from pkg.models import heads\nfrom pkg.models import __doc__ as doc\n",
        },
    )
    cycles, graph = _cycles(tmp_path)
    assert [c.modules for c in cycles] == [("pkg.models.heads", "pkg.registry")]
    # the package's __init__ runs on the way (registry lies outside pkg.models): an edge, in no cycle
    assert set(graph.edges["pkg.registry"]) == {"pkg.models", "pkg.models.heads"}


def test_package_init_reexport_cycle(tmp_path: Path) -> None:
    # a module outside the package imports one of its submodules: the package's __init__ runs first, and it
    # re-exports a submodule that imports the outside module back
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/layers/__init__.py": "from pkg.layers.lora import Lora\n",
            "pkg/layers/lora.py": "from pkg.config import Config\n",
            "pkg/layers/mlp.py": "from pkg.layers.lora import Lora\n",  # inside pkg.layers: no edge to its __init__
            "pkg/config.py": "def build():\n    from pkg.layers.mlp import Mlp\n",
        },
    )
    cycles, _ = _cycles(tmp_path)
    assert [c.modules for c in cycles] == [("pkg.config", "pkg.layers", "pkg.layers.lora", "pkg.layers.mlp")]
    assert ("pkg.layers.mlp", "pkg.layers") not in _edges(cycles[0])
    assert ("pkg.config", "pkg.layers") in _edges(cycles[0])


def test_self_import_is_a_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/loop.py": "import importlib\nimportlib.import_module('pkg.loop')\n"})
    cycles, _ = _cycles(tmp_path)
    assert [(c.modules, c.chains) for c in cycles] == [(("pkg.loop",), (("pkg.loop", "pkg.loop"),))]


def test_acyclic_tree(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.api import run\n",
            "pkg/api.py": "from pkg.core import engine\nfrom . import util\nimport numpy\n",
            "pkg/core/__init__.py": "from .engine import Engine\n",
            "pkg/core/engine.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.util import U\n",
            "pkg/util.py": "import os.path\nfrom pkg.missing import nothing\n",
            "other/__init__.py": "def f():\n    from pkg import api\n",
        },
    )
    cycles, graph = _cycles(tmp_path, "pkg", "other")
    assert cycles == []
    assert set(graph.edges["pkg.api"]) == {"pkg.core", "pkg.core.engine", "pkg.util"}
    assert set(graph.edges["other"]) == {"pkg", "pkg.api"}  # pkg/__init__.py runs before pkg.api
    assert "pkg.util" not in graph.edges  # a missing module below its own package: nothing runs
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--package", "pkg", "--package", "other"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 cycle(s)" in done.stdout


def test_command_line_exit_status(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg.a\n"})
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--package", "pkg"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "pkg.a -> pkg.b -> pkg.a" in done.stdout and "pkg/b.py:1" in done.stdout
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--package", "nope"], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_repository_has_no_import_cycles() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_reading_a_name_from_the_own_package_init_is_an_edge(tmp_path: Path) -> None:
    # pkg/__init__.py imports pkg.api, which reads VERSION from pkg/__init__.py before it is defined there
    _write(
        tmp_path, {"pkg/__init__.py": "from pkg.api import run\nVERSION = 1\n", "pkg/api.py": "from . import VERSION\n"}
    )
    cycles, _ = _cycles(tmp_path)
    assert [c.chains for c in cycles] == [(("pkg", "pkg.api", "pkg"),)]
