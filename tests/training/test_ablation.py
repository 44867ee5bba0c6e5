"""The Table V-style ablation command: four rows trained with their switches, scored, Δm against the first row."""

import json
from pathlib import Path

import yaml

from endostream.cli import main
from tests.training.conftest import TINY_OVERRIDES
from training.ablation import ABLATION_ROWS
from training.checkpoint import load_checkpoint


def test_ablate_cli_trains_each_row_with_its_switches(synth_data: Path, tmp_path: Path):
    out = tmp_path / "ablation"
    argv = ["ablate", "--data", str(synth_data), "--out", str(out), "--no-progress", *TINY_OVERRIDES, "train.epochs=1"]
    assert main(argv) == 0
    results = json.loads((out / "ablation.json").read_text())
    assert list(results) == list(ABLATION_ROWS)

    row_dirs = {row: out / Path(result["meta"]["checkpoint"]).parent.name for row, result in results.items()}
    adapters = {row: yaml.safe_load((d / "config.yaml").read_text())["model"] for row, d in row_dirs.items()}
    assert adapters["backbone only"]["adapters"]["task_rank"] == 0 and not adapters["backbone only"]["sma"]["enabled"]
    assert adapters["+TESLA"]["adapters"]["task_rank"] > 0 and not adapters["+TESLA"]["sma"]["enabled"]
    assert adapters["+SMA"]["adapters"]["task_rank"] == 0 and adapters["+SMA"]["sma"]["enabled"]
    assert adapters["all (EndoARSS)"]["adapters"]["task_rank"] > 0 and adapters["all (EndoARSS)"]["sma"]["enabled"]
    # The SMA switch really removes the module (not just a flag in the config).
    assert load_checkpoint(row_dirs["+SMA"] / "best-merged").model.sma is not None
    assert load_checkpoint(row_dirs["backbone only"] / "best-merged").model.sma is None

    assert results["backbone only"]["delta_m"] == 0.0
    for result in results.values():
        assert result["meta"]["split"] == "test" and result["segmentation"]["ssim"] is not None
    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + len(ABLATION_ROWS) and "Δm (%)" in table[0]

    # A second call finds every row trained and only re-scores them.
    stamps = {row: (d / "best-merged" / "model.safetensors").stat().st_mtime_ns for row, d in row_dirs.items()}
    assert main(argv) == 0
    assert stamps == {row: (d / "best-merged" / "model.safetensors").stat().st_mtime_ns for row, d in row_dirs.items()}
