"""The Table V-style ablation command: rows trained with their switches, single-task baselines, Δm per task against
them, seeds with spread, and honest resume (own state; retrain when the resolved config changed)."""

import json
from pathlib import Path

import pytest
import yaml

from endostream.cli import main
from tests.training.conftest import TINY_OVERRIDES
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.engine.supervised import TaskTrainer
from training.eval.report import delta_m
from training.jobs.ablation import ABLATION_ROWS, ROW_STATE, run_row

pytestmark = pytest.mark.timeout(120)

STL_ROWS = ["single-task activity", "single-task segmentation"]


def test_ablate_cli_trains_each_row_with_its_switches(synth_data: Path, tmp_path: Path):
    out = tmp_path / "ablation"
    argv = [
        "ablate",
        "--data",
        str(synth_data),
        "--out",
        str(out),
        "--no-progress",
        *TINY_OVERRIDES,
        "train.epochs=1",
        "train.threads=1",
    ]
    assert main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    rows = report["rows"]
    assert list(rows) == [*ABLATION_ROWS, *STL_ROWS]

    row_dirs = {row: Path(r["seeds"][0]["meta"]["checkpoint"]).parent for row, r in rows.items()}
    models = {row: yaml.safe_load((d / "config.yaml").read_text())["model"] for row, d in row_dirs.items()}
    assert models["backbone only"]["adapters"]["task_rank"] == 0 and not models["backbone only"]["sma"]["enabled"]
    assert models["+TESLA"]["adapters"]["task_rank"] > 0 and not models["+TESLA"]["sma"]["enabled"]
    assert models["+SMA"]["adapters"]["task_rank"] == 0 and models["+SMA"]["sma"]["enabled"]
    assert models["all (EndoARSS)"]["adapters"]["task_rank"] > 0 and models["all (EndoARSS)"]["sma"]["enabled"]
    # The SMA switch really removes the module (not just a flag in the config).
    assert load_checkpoint(row_dirs["+SMA"] / "best-merged").model.sma is not None
    assert load_checkpoint(row_dirs["backbone only"] / "best-merged").model.sma is None
    # Single-task rows: the `all` model with one head, scored on their own task only.
    assert load_checkpoint(row_dirs["single-task activity"] / "best-merged").model.tasks == ("activity",)
    assert set(rows["single-task segmentation"]["seeds"][0]) == {"segmentation", "meta"}

    stl = {"activity": rows[STL_ROWS[0]]["seeds"][0], "segmentation": rows[STL_ROWS[1]]["seeds"][0]}
    for row in ABLATION_ROWS:
        result = rows[row]["seeds"][0]
        assert result["meta"]["split"] == "test" and result["segmentation"]["ssim"] is not None
        assert result["delta_m"] == pytest.approx(delta_m(result, stl))
        assert rows[row]["summary"]["delta_m"] == {"mean": result["delta_m"], "std": None}
    assert "delta_m" not in rows[STL_ROWS[0]]["seeds"][0]
    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and "Δm (%)" in table[0]

    # A second call finds every row trained with the same config and only re-reads its scores.
    stamps = {row: (d / "best-merged" / "model.safetensors").stat().st_mtime_ns for row, d in row_dirs.items()}
    assert main(argv) == 0
    assert stamps == {row: (d / "best-merged" / "model.safetensors").stat().st_mtime_ns for row, d in row_dirs.items()}


def test_ablate_seeds_report_mean_and_std(synth_data: Path, tmp_path: Path):
    out = tmp_path / "ablation"
    rows = "all_endoarss,single_task_activity,single_task_segmentation"
    argv = ["ablate", "--data", str(synth_data), "--out", str(out), "--no-progress", "--seeds", "2", "--rows", rows]
    assert main([*argv, *TINY_OVERRIDES, "train.epochs=1", "data.limit=8", "train.threads=1"]) == 0
    report = json.loads((out / "ablation.json").read_text())["rows"]
    runs = report["all (EndoARSS)"]["seeds"]
    assert [r["meta"]["seed"] for r in runs] == [0, 1]
    for index, run in enumerate(runs):  # Δm per seed, against the single-task rows of the same seed
        stl = {"activity": report[STL_ROWS[0]]["seeds"][index], "segmentation": report[STL_ROWS[1]]["seeds"][index]}
        assert run["delta_m"] == pytest.approx(delta_m(run, stl))
    summary = report["all (EndoARSS)"]["summary"]
    accuracy = [r["activity"]["accuracy"] for r in runs]
    assert summary["activity.accuracy"]["mean"] == pytest.approx(sum(accuracy) / 2)
    assert summary["activity.accuracy"]["std"] == pytest.approx(abs(accuracy[0] - accuracy[1]) / 2**0.5)
    assert summary["delta_m"]["std"] is not None
    assert " ± " in (out / "ablation.md").read_text()
    with pytest.raises(ValueError, match="unknown ablation rows"):
        main(["-v", *argv[:-1], "all_endoarss,nope"])


class _Interrupted(Exception):
    pass


def test_row_resumes_from_its_own_state_and_retrains_when_the_config_changed(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run_dir = tmp_path / "row"
    small = [*TINY_OVERRIDES, f"data.root={synth_data}", "data.limit=8", "train.threads=1"]
    cfg = load_config("tiny", [*small, "train.epochs=2"])
    end_of_epoch = TaskTrainer._end_of_epoch

    def stop_after_first_epoch(self, epoch, *args):
        end_of_epoch(self, epoch, *args)
        raise _Interrupted

    monkeypatch.setattr(TaskTrainer, "_end_of_epoch", stop_after_first_epoch)
    with pytest.raises(_Interrupted):
        run_row(cfg, run_dir)
    assert (run_dir / "best-merged").is_dir()  # what the old ablation took for a finished row
    monkeypatch.setattr(TaskTrainer, "_end_of_epoch", end_of_epoch)

    def epochs() -> list[int]:
        return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    run_row(cfg, run_dir)
    assert epochs() == [1, 2]  # epoch 2 trained, resumed from RUN/last, epoch 1 not repeated
    assert json.loads((run_dir / ROW_STATE).read_text())["finished"] is True

    changed = load_config("tiny", [*small, "train.epochs=1"])
    run_row(changed, run_dir)
    assert epochs() == [1]  # a fresh run for the new config, not the old row re-scored
    stamp = (run_dir / "best-merged" / "model.safetensors").stat().st_mtime_ns
    run_row(changed, run_dir)
    assert (run_dir / "best-merged" / "model.safetensors").stat().st_mtime_ns == stamp
