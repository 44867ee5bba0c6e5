"""scripts/temporal_split_study.py on a toy checkpoint: rotations test on other clips, every run is scored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint
from training.temporal.clips import ClipSetSpec
from training.temporal.features import build_feature_set
from training.temporal.train import TCNConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "temporal_split_study.py"
SPEC = ClipSetSpec(seed=3, clips=6, seconds=3.0, frame_interval_s=0.5, render_size=64, fractions=(4, 1, 1))


def _script():
    spec = importlib.util.spec_from_file_location("temporal_split_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rotations_and_report(tmp_path: Path) -> None:
    study = _script()
    ckpt = make_checkpoint(tmp_path / "best", [])
    data = build_feature_set(ckpt, SPEC, cache_dir=tmp_path / "cache", progress=False)
    assert [c.split for c in data.clips] == ["train"] * 4 + ["val", "test"]
    # rotation 1 moves the split labels by the 2 held-out clips: other clips are tested, sizes stay
    once = study.rotated(data, 1)
    assert [c.split for c in once.clips] == ["val", "test"] + ["train"] * 4
    assert [c.split for c in data.clips][-1] == "test"  # the original is untouched
    assert [c.name for c in once.clips] == [c.name for c in data.clips]

    report = study.study(data, 2, [0], TCNConfig(epochs=2, layers=2), gain_pt=3.0, reduction=5.0)
    assert report["total"] == 2 and report["clips"] == {"train": 4, "val": 1, "test": 1}
    assert [(r["rotation"], r["seed"]) for r in report["runs"]] == [(0, 0), (1, 0)]
    for run in report["runs"]:
        assert set(run["methods"]) == {"per-frame", "tcn_raw", "tcn"}
        versus = run["tcn_vs_per_frame"]
        gain = run["methods"]["tcn"]["frame_accuracy"] - run["methods"]["per-frame"]["frame_accuracy"]
        assert versus["accuracy_gain_pt"] == pytest.approx(gain)
        assert run["meets_targets"] == study.meets(versus, 3.0, 5.0)
    assert report["met"] == sum(r["meets_targets"] for r in report["runs"])
    table = study.markdown(report)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3  # the header and one row per run
    assert f"Targets met in {report['met']} of 2 runs." in table
    json.dumps(report)  # the report is plain JSON


def test_meets() -> None:
    study = _script()
    assert study.meets({"accuracy_gain_pt": 3.5, "spurious_switch_reduction": 5.2}, 3.0, 5.0)
    assert not study.meets({"accuracy_gain_pt": 3.5, "spurious_switch_reduction": 4.9}, 3.0, 5.0)
    assert not study.meets({"accuracy_gain_pt": 2.9, "spurious_switch_reduction": 9.0}, 3.0, 5.0)
    assert study.meets({"accuracy_gain_pt": 3.0, "spurious_switch_reduction": None}, 3.0, 5.0)  # no flicker at all
