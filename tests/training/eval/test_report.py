"""Result JSON layout, paper-style markdown tables and Δm sign conventions."""

import json
from pathlib import Path

import numpy as np
import pytest

from training.eval.metrics import ClassificationMeter, SegmentationMeter
from training.eval.report import delta_m, evaluation_result, load_result, markdown_table, same_baseline

pytestmark = pytest.mark.timeout(60)


def make_result(acc=0.7218, f1=0.6677, miou=0.7295, dice=0.8347, hd95=19.526, ssim=0.9126, **meta):
    seg = {"miou": miou, "dice": dice, "hd95": hd95, "ssim": ssim, "hd_mean": 4.0}
    return evaluation_result({"accuracy": acc, "f1_macro": f1}, seg, meta or {"checkpoint": "runs/a/best"})


def test_result_json_from_meters_has_the_nested_keys():
    activity, segmentation = ClassificationMeter(3), SegmentationMeter(3)
    activity.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    maps = np.zeros((2, 16, 16), np.int64)
    maps[:, 4:9, 4:9] = 1
    segmentation.update(maps, maps)
    meta = {"checkpoint": "runs/x/best-merged", "split": "test", "images": 2, "classes": ["bg", "tool", "tissue"]}
    result = evaluation_result(activity.compute(), segmentation.compute(), meta)
    for section, key in [("activity", "accuracy"), ("activity", "f1_macro")] + [
        ("segmentation", k) for k in ("miou", "dice", "hd95", "ssim", "hd_mean", "per_class", "miou_no_bg")
    ]:
        assert key in result[section], f"{section}.{key}"
    assert result["meta"] == meta
    assert result["segmentation"]["per_class"]["2"]["iou"] is None  # class 2 never occurs
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN, no numpy types


def test_result_converts_numpy_and_nan():
    result = evaluation_result(
        {"accuracy": np.float64(0.5), "f1_macro": np.float32(0.25)},
        {"miou": 0.5, "dice": float("nan"), "hd95": np.array([1.0])[0], "ssim": 0.9, "cm": np.eye(2, dtype=int)},
        {"split": Path("test")},
    )
    assert type(result["activity"]["accuracy"]) is float and result["segmentation"]["dice"] is None
    assert result["segmentation"]["cm"] == [[1, 0], [0, 1]] and result["meta"]["split"] == "test"


def test_result_names_a_missing_metric():
    with pytest.raises(ValueError, match="hd95"):
        evaluation_result({"accuracy": 1.0, "f1_macro": 1.0}, {"miou": 1, "dice": 1, "ssim": 1}, {})


def test_markdown_table_uses_paper_units():
    table = markdown_table([("EndoARSS | TESLA", make_result()), ("no seg", make_result(miou=None))])
    lines = table.splitlines()
    assert lines[0] == "| Run | Acc (%) | F1 (%) | mIoU (%) | Dice (%) | HD95 (px) | SSIM (%) |"
    assert lines[1] == "|:---|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| EndoARSS \\| TESLA | 72.18 | 66.77 | 72.95 | 83.47 | 19.53 | 91.26 |"
    assert lines[3] == "| no seg | 72.18 | 66.77 | N/A | 83.47 | 19.53 | 91.26 |"
    assert len(lines) == 4


def test_markdown_table_single_result_named_dict_and_delta_column():
    single = markdown_table(make_result()).splitlines()
    assert single[2].startswith("| runs/a/best | 72.18 |")
    base, better = make_result(), make_result(acc=0.80)
    better["delta_m"] = delta_m(better, same_baseline(base))
    named = markdown_table({"baseline": base, "ours": better}).splitlines()
    assert named[0].endswith("| SSIM (%) | Δm (%) |")
    assert named[2].endswith("| N/A |")
    assert named[3].startswith("| ours | 80.00 |") and named[3].endswith(f"| {better['delta_m']:+.2f} |")


def test_delta_m_signs_and_value():
    base = make_result(acc=0.5, hd95=10.0)
    same = same_baseline(base)
    assert delta_m(base, same) == 0.0
    # Per task first (activity: 2 metrics, segmentation: 4), then over the 2 tasks.
    assert delta_m(make_result(acc=0.6, hd95=10.0), same) == pytest.approx(20.0 / 2 / 2)  # better accuracy: positive
    assert delta_m(make_result(acc=0.5, hd95=12.0), same) == pytest.approx(-20.0 / 4 / 2)  # larger HD95: negative
    assert delta_m(make_result(acc=0.5, hd95=8.0), same) == pytest.approx(20.0 / 4 / 2)
    # The flat mean over six metrics gave 0 here; per task, +20 % on one of two activity metrics outweighs
    # -20 % on one of four segmentation metrics.
    assert delta_m(make_result(acc=0.6, hd95=12.0), same) == pytest.approx(2.5)
    only_acc = delta_m(make_result(acc=0.6), same, metrics=[("activity", "accuracy", False)])
    assert only_acc == pytest.approx(20.0)
    perfect = make_result(hd95=0.0)
    assert delta_m(perfect, same_baseline(perfect)) == 0.0
    with pytest.raises(ValueError, match="hd95 is 0"):
        delta_m(make_result(hd95=1.0), same_baseline(perfect))


def test_delta_m_against_single_task_baselines():
    activity_only = evaluation_result({"accuracy": 0.5, "f1_macro": 0.4}, None, {"checkpoint": "stl_a"})
    seg_only = evaluation_result(None, {"miou": 0.5, "dice": 0.6, "hd95": 10.0, "ssim": 0.8}, {"checkpoint": "stl_s"})
    baselines = {"activity": activity_only, "segmentation": seg_only}
    mtl = make_result(acc=0.55, f1=0.4, miou=0.5, dice=0.6, hd95=10.0, ssim=0.8)
    assert delta_m(mtl, baselines) == pytest.approx(10.0 / 2 / 2)
    with pytest.raises(ValueError, match="no baseline for task 'segmentation'"):
        delta_m(mtl, {"activity": activity_only})
    assert "segmentation" not in activity_only and markdown_table([("stl", activity_only)]).endswith("| N/A |")


def test_delta_m_names_the_missing_key():
    base = make_result()
    del base["segmentation"]["hd95"]
    with pytest.raises(ValueError, match=r"baseline lacks segmentation\.hd95"):
        delta_m(make_result(), same_baseline(base))
    with pytest.raises(ValueError, match=r"result lacks segmentation\.ssim"):
        delta_m(make_result(ssim=None), same_baseline(make_result()))


def test_load_result_round_trip_and_errors(tmp_path: Path):
    path = tmp_path / "eval.json"
    result = make_result(split="val")
    path.write_text(json.dumps(result))
    assert load_result(path) == result
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_result(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_result(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"loss": 1}')
    with pytest.raises(ValueError, match="'activity' or 'segmentation'"):
        load_result(tmp_path / "other.json")
