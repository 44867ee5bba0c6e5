"""Corruption robustness: the 19 ImageNet-C corruptions from the imagecorruptions package, seeded, image only; the
report's per-family / per-severity means relative to clean; `endostream eval --corruptions` end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from endostream.cli import main
from tests.training.conftest import TINY_OVERRIDES
from training.config import load_config
from training.engine.run import train
from training.eval.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    CorruptedDataset,
    corrupt_image,
    parse_corruptions,
    parse_severities,
)
from training.eval.robustness_report import build_report, markdown_report

pytestmark = pytest.mark.timeout(120)


def _frame(size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([(xx * 5) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)


def test_the_19_corruptions_in_4_families():
    assert len(CORRUPTIONS) == 19 == len(set(CORRUPTIONS))
    assert list(FAMILIES) == ["noise", "blur", "weather", "digital"]
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("noise,fog,gaussian_noise") == [*FAMILIES["noise"], "fog"]
    assert parse_severities("1-5") == [1, 2, 3, 4, 5] and parse_severities("5,1-2") == [1, 2, 5]
    with pytest.raises(ValueError, match="'smoke'"):
        parse_corruptions("smoke")
    with pytest.raises(ValueError, match="1..5"):
        parse_severities("0-3")


def test_every_corruption_runs_is_seeded_and_changes_only_the_image():
    image = _frame()
    for name in CORRUPTIONS:
        first, again = corrupt_image(image, name, 3, seed=7), corrupt_image(image, name, 3, seed=7)
        assert first.dtype == np.uint8 and first.shape == image.shape, name
        np.testing.assert_array_equal(first, again, err_msg=name)
        assert not np.array_equal(first, image), name
    noisy = [corrupt_image(image, "gaussian_noise", 3, seed=s) for s in (1, 2)]
    assert not np.array_equal(*noisy)  # the seed matters
    state = np.random.get_state()[1].copy()
    corrupt_image(image, "shot_noise", 1, seed=3)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the caller's random stream is untouched

    mask = np.zeros((48, 48), np.uint8)
    mask[10:20, 10:30] = 2
    dataset = CorruptedDataset([{"image": image, "mask": mask, "activity": 1, "name": "f"}], "motion_blur", 4, seed=0)
    sample = dataset[0]
    assert sample["mask"] is mask and sample["activity"] == 1
    assert not np.array_equal(sample["image"], image)
    np.testing.assert_array_equal(sample["image"], dataset[0]["image"])


def test_report_means_relative_to_clean():
    clean = {"accuracy": 0.8, "miou": 0.5, "dice": 0.6}
    scores = {
        "gaussian_noise": {
            1: {"accuracy": 0.8, "miou": 0.5, "dice": 0.6},
            5: {"accuracy": 0.4, "miou": 0.3, "dice": 0.4},
        },
        "fog": {1: {"accuracy": 0.6, "miou": 0.5, "dice": 0.6}, 5: {"accuracy": 0.2, "miou": 0.1, "dice": 0.2}},
    }
    report = build_report(clean, scores, {"split": "test"})
    assert report["corruptions"]["gaussian_noise"]["mean"]["accuracy"] == pytest.approx(0.6)
    assert report["families"]["noise"]["drop_pct"]["accuracy"] == pytest.approx(25.0)
    assert report["families"]["weather"]["relative"]["miou"] == pytest.approx(0.6)
    assert report["severities"]["5"]["mean"]["accuracy"] == pytest.approx(0.3)
    assert report["mean_over_corruptions"]["relative"]["accuracy"] == pytest.approx(0.5 / 0.8)
    text = markdown_report(report)
    assert "| noise | 1 | 60.00 |" in text and "| 5 | 30.00 |" in text


def test_eval_cli_scores_every_corrupted_version(synth_data: Path, tmp_path: Path):
    cfg = load_config("tiny", [*TINY_OVERRIDES, f"data.root={synth_data}", "train.epochs=1", "train.threads=1"])
    checkpoint = train(cfg, tmp_path / "run", progress=False).checkpoint
    out = tmp_path / "robustness"
    argv = ["eval", str(checkpoint), "--data", str(synth_data), "--corruptions", "gaussian_noise,contrast"]
    assert main([*argv, "--severities", "1,5", "--limit", "4", "--out", str(out)]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["meta"]["frames"] == 4
    assert list(report["corruptions"]) == ["gaussian_noise", "contrast"]
    assert list(report["corruptions"]["contrast"]["severities"]) == ["1", "5"]
    assert set(report["families"]) == {"noise", "digital"}
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Per family" in (out / "robustness.md").read_text()
    # The clean row is the plain evaluation of the same frames.
    plain = tmp_path / "plain.json"
    assert main(["eval", str(checkpoint), "--data", str(synth_data), "--limit", "4", "--json", str(plain)]) == 0
    assert report["clean"]["accuracy"] == json.loads(plain.read_text())["activity"]["accuracy"]
    assert report["clean"]["miou"] == pytest.approx(json.loads(plain.read_text())["segmentation"]["miou"])
