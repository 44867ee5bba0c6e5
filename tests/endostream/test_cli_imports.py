"""The command line stays light: importing it or building its parser imports neither torch nor training/, and
`endostream serve` parses and answers --help where training/ is absent (the serving images ship without it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "training", "export", "onnxruntime", "cv2", "uvicorn", "fastapi")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def _loaded_after(statement: str) -> set[str]:
    done = _python(f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize(
    "statement",
    ["import endostream.cli", "from endostream.cli import build_parser; build_parser()"],
    ids=["import", "build_parser"],
)
def test_cli_imports_no_heavy_package(statement: str) -> None:
    assert _loaded_after(statement) == set()


def test_serve_parses_without_training() -> None:
    # sys.modules[name] = None makes every `import training...` fail, as in an image that lacks the folder
    done = _python(
        "import sys\nsys.modules['training'] = sys.modules['torch'] = None\n"
        "from endostream.cli import main\nmain(['serve', '--help'])"
    )
    assert done.returncode == 0, done.stderr
    assert "--max-batch" in done.stdout and "--stream-allowlist" in done.stdout


def test_every_command_has_a_runner() -> None:
    from endostream.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert len(sub.choices) == len(COMMANDS)
    leaves = [sub]
    while leaves:
        action = leaves.pop()
        for child in action.choices.values():
            nested = [a for a in child._actions if a.__class__.__name__ == "_SubParsersAction"]
            if nested:
                leaves.extend(nested)
            else:
                assert callable(child.get_default("func")), f"`{child.prog}` runs nothing"
