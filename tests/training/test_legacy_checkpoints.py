"""Checkpoints written by the flat training/ layout (tests/data/legacy_checkpoints, one per family) still load with
the same outputs and still export: the re-layout changed no checkpoint format, config name or builder result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from export.manifest import read_manifest
from export.onnx_export import export_onnx, generated_frames
from training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(300)

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_checkpoints"
FAMILIES = sorted(path.name for path in LEGACY.iterdir() if path.is_dir())


def test_every_family_has_a_legacy_checkpoint():
    assert FAMILIES == ["bdta", "endoarss", "endoarss_merged", "msam", "sak", "ta_lora"]
    families = {json.loads((LEGACY / name / "config.json").read_text())["family"] for name in FAMILIES}
    assert families == {"bdta", "endoarss", "msam", "sak"}


@pytest.mark.parametrize("name", FAMILIES)
def test_legacy_checkpoint_loads_with_the_outputs_it_was_saved_with(name: str):
    ckpt = load_checkpoint(LEGACY / name)
    assert ckpt.merged == (name == "endoarss_merged")
    frames = torch.from_numpy(generated_frames(2, 64, 64, seed=5)).permute(0, 3, 1, 2)
    with torch.no_grad():
        got = ckpt.model.eval()(frames)
    want = load_file(str(LEGACY / name / "expected_outputs.safetensors"))
    assert set(got) == set(want)
    for task, value in want.items():
        torch.testing.assert_close(got[task], value, atol=1e-5, rtol=1e-4, msg=f"{name} {task}")


@pytest.mark.parametrize("name", FAMILIES)
def test_legacy_checkpoint_exports_with_passed_parity(name: str, tmp_path: Path):
    export_onnx(LEGACY / name, tmp_path / "bundle", overwrite=True)
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.family == json.loads((LEGACY / name / "config.json").read_text())["family"]
    assert manifest.checks["parity"]["passed"]
    assert [t.output for t in manifest.tasks] == ["activity_probs", "segmentation"]
