"""End-to-end training on generated data: run folder, best/merged checkpoints, resume, eval CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from endostream.cli import main
from tests.training.conftest import TINY_OVERRIDES
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.engine.run import train


@pytest.fixture(scope="module")
def run_dir(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", [*TINY_OVERRIDES, "train.epochs=2", f"data.root={synth_data}"])
    result = train(cfg, out, progress=False)
    assert result.epochs_run == 2 and result.best_epoch in (1, 2)
    return out


def test_run_folder_layout(run_dir: Path):
    for name in ("config.yaml", "metrics.jsonl", "last/trainer_state.pt"):
        assert (run_dir / name).is_file(), name
    for ckpt in ("best", "best-merged", "last"):
        for name in ("model.safetensors", "config.json", "labels.json"):
            assert (run_dir / ckpt / name).is_file(), f"{ckpt}/{name}"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"accuracy", "f1_macro"} <= set(records[0]["val"]["activity"])
    assert "miou" in records[0]["val"]["segmentation"]


def test_merged_checkpoint_has_no_adapter_tensors_and_same_predictions(run_dir: Path, synth_data: Path):
    merged_keys = load_file(str(run_dir / "best-merged" / "model.safetensors")).keys()
    assert not [k for k in merged_keys if "lora_" in k]
    assert [k for k in load_file(str(run_dir / "best" / "model.safetensors")) if "lora_" in k]
    plain, merged = load_checkpoint(run_dir / "best"), load_checkpoint(run_dir / "best-merged")
    assert merged.merged and not plain.merged
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = plain.model.eval()(images), merged.model.eval()(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-4, rtol=1e-4)


def test_resume_continues_from_last(run_dir: Path, synth_data: Path):
    cfg = load_config("tiny", [*TINY_OVERRIDES, "train.epochs=3", f"data.root={synth_data}"])
    result = train(cfg, run_dir, resume=True, progress=False)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3] and result.epochs_run == 3


def test_eval_cli_writes_json_and_table(run_dir: Path, synth_data: Path, tmp_path: Path):
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    code = main(
        [
            "eval",
            str(run_dir / "best-merged"),
            "--data",
            str(synth_data),
            "--split",
            "test",
            "--json",
            str(out),
            "--markdown",
            str(md),
            "--baseline",
            str(out.parent / "missing.json"),
        ]
    )
    assert code == 2  # a missing baseline file is a user error with a message, not a traceback
    assert (
        main(
            ["eval", str(run_dir / "best-merged"), "--data", str(synth_data), "--json", str(out), "--markdown", str(md)]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in ("accuracy", "f1_macro"):
        assert 0.0 <= result["activity"][key] <= 1.0
    for key in ("miou", "dice", "hd95", "ssim"):
        assert key in result["segmentation"]
    assert "mIoU" in md.read_text()
    legend = [line for line in md.read_text().splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in legend] == ["- Acc", "- F1", "- mIoU", "- Dice", "- HD95", "- SSIM", "- Δm"]
    assert (
        main(
            [
                "eval",
                str(run_dir / "best"),
                "--data",
                str(synth_data),
                "--json",
                str(tmp_path / "b.json"),
                "--baseline",
                str(out),
            ]
        )
        == 0
    )
    # best and best-merged predict the same, so their delta-m is ~0.
    assert abs(json.loads((tmp_path / "b.json").read_text())["delta_m"]) < 0.05


def test_eval_rejects_non_checkpoint(tmp_path: Path, synth_data: Path):
    assert main(["eval", str(tmp_path), "--data", str(synth_data)]) == 2
