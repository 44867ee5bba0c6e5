"""Evaluation results: the result JSON, paper-style markdown tables, and the multi-task gain Δm.

The table follows the EndoARSS paper's tables (IV-C, Tables II-VI): AC(%), F-score(%), mIoU(%), DS(%), HD, SSIM(%),
percentages x100 with two decimals and distances in pixels. Our HD column is the boundary HD95 (see
training/eval/metrics.py); the paper's "HD" is the row Hausdorff of its code, kept in the JSON as `hd_rows_paper_code`.

Δm (Maninis et al. 2019, "Attentive single-tasking of multiple tasks"; the multi-task gain of LibMTL and of
EndoARSS-style MTL papers) is the relative change against single-task baselines, averaged within each task first and
then over the tasks, so a task with more metrics does not weigh more:
Δm = 1/T Σ_t 1/K_t Σ_i (-1)^{l_i} (M_t,i - M_STL,t,i) / M_STL,t,i x 100, with l_i = 1 when lower is better (HD95),
0 otherwise. Metrics: activity accuracy and macro F1; segmentation mIoU, Dice, HD95 and SSIM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# (section, key) of every metric that enters Δm, and whether lower is better.
DELTA_M_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("activity", "accuracy", False),
    ("activity", "f1_macro", False),
    ("segmentation", "miou", False),
    ("segmentation", "dice", False),
    ("segmentation", "hd95", True),
    ("segmentation", "ssim", False),
)

# Table columns: header, section, key, scale (fractions x100 as the paper prints them; distances as they are).
TABLE_COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    ("Acc (%)", "activity", "accuracy", 100.0),
    ("F1 (%)", "activity", "f1_macro", 100.0),
    ("mIoU (%)", "segmentation", "miou", 100.0),
    ("Dice (%)", "segmentation", "dice", 100.0),
    ("HD95 (px)", "segmentation", "hd95", 1.0),
    ("SSIM (%)", "segmentation", "ssim", 100.0),
)

# One line per metric, printed under the tables of `endostream eval --markdown` (and the demo's eval.md).
METRIC_LEGEND: tuple[str, ...] = (
    "- Acc: share of frames whose predicted activity is the labelled one.",
    "- F1: macro F1 over the activity classes that occur in the labels or the predictions (scikit-learn's).",
    "- mIoU: mean over classes, background included, of TP / (TP + FP + FN) from one confusion matrix over the split.",
    "- Dice: mean over classes, background included, of 2 TP / (2 TP + FP + FN) from the same matrix.",
    "- HD95: 95th percentile of the distances (px) between the predicted and true boundary of each class, per image, "
    "then averaged (a class in only one of the two maps scores the image diagonal). Reported instead of the maximum "
    "Hausdorff distance because one stray pixel sets the maximum; the paper's code measures a Hausdorff distance "
    "between label-map rows, not boundaries, which the JSON keeps as `hd_rows_paper_code` for comparison only.",
    "- SSIM: structural similarity of the one-hot target and the class probability map, per class, averaged over the "
    "images where the class occurs in the target or the prediction (absent-from-both classes would score 1).",
    "- Δm: relative change against single-task baselines, averaged within each task, then over tasks; HD95 counts "
    "with the sign flipped (lower is better).",
)

_REQUIRED = {"activity": ("accuracy", "f1_macro"), "segmentation": ("miou", "dice", "hd95", "ssim")}


def _json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays become numbers and lists, NaN and inf become None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy array or scalar
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def evaluation_result(
    activity: dict[str, Any] | None, segmentation: dict[str, Any] | None, meta: dict[str, Any]
) -> dict[str, Any]:
    """The result JSON: `{"activity": {...}, "segmentation": {...}, "meta": {...}}`.

    Args:
        activity: `ClassificationMeter.compute()` (needs `accuracy`, `f1_macro`); None for a segmentation-only model.
        segmentation: `SegmentationMeter.compute()` (needs `miou`, `dice`, `hd95`, `ssim`); None for an
            activity-only model.
        meta: what was evaluated, e.g. checkpoint, split, number of images, class names; stored as given.

    Returns:
        A JSON-serialisable dict (numpy values converted, NaN as None); a None section is left out.
    """
    sections = {k: v for k, v in (("activity", activity), ("segmentation", segmentation)) if v is not None}
    if not sections:
        raise ValueError("evaluation_result needs the activity or the segmentation metrics (both are None)")
    for section, metrics in sections.items():
        missing = [key for key in _REQUIRED[section] if key not in metrics]
        if missing:
            raise ValueError(f"{section} metrics lack {missing}; pass the dict from the meter's compute()")
    return _json_safe({**sections, "meta": meta})


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result JSON written from `evaluation_result`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no result JSON at {path}; write one with `endostream eval ... --json {path}`")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected the output of `endostream eval --json`") from err
    if not isinstance(result, dict) or not {"activity", "segmentation"} & result.keys():
        raise ValueError(f"{path} has no 'activity' or 'segmentation' section; is it an endostream result?")
    return result


def _metric(result: Mapping[str, Any], section: str, key: str) -> float | None:
    value = result.get(section, {}).get(key)
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def delta_m(
    result: Mapping[str, Any],
    baselines: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[tuple[str, str, bool]] = DELTA_M_METRICS,
) -> float:
    """Δm of `result` in percent (module docstring): per task, then over tasks; positive means better on average.

    A metric that is 0 in both counts as unchanged; 0 in the baseline only is an error (relative change undefined).

    Args:
        result: result dict (`evaluation_result` layout) of the model under test.
        baselines: the reference result of each task, keyed by section: `{"activity": stl_activity_result,
            "segmentation": stl_segmentation_result}` for the papers' Δm against single-task models (`same_baseline`
            puts one multi-task result under both keys).
        metrics: (section, key, lower_is_better) triples; sections are the tasks. Default: accuracy, f1_macro | miou,
            dice, hd95, ssim.
    """
    if not metrics:
        raise ValueError("delta_m needs at least one metric")
    per_task: dict[str, list[float]] = {}
    for section, key, lower_is_better in metrics:
        baseline = baselines.get(section)
        if baseline is None:
            raise ValueError(f"no baseline for task {section!r}; pass its single-task result under that key")
        ours, base = _metric(result, section, key), _metric(baseline, section, key)
        if base is None:
            raise ValueError(f"baseline lacks {section}.{key}; evaluate it with boundary and SSIM metrics on")
        if ours is None:
            raise ValueError(f"result lacks {section}.{key}; evaluate it with boundary and SSIM metrics on")
        if base == 0 and ours != 0:
            raise ValueError(f"baseline {section}.{key} is 0, so the relative change is undefined; drop the metric")
        sign = -1.0 if lower_is_better else 1.0
        change = 0.0 if base == 0 else sign * (ours - base) / base * 100.0  # both 0 (e.g. a perfect HD95): no change
        per_task.setdefault(section, []).append(change)
    return sum(sum(terms) / len(terms) for terms in per_task.values()) / len(per_task)


def same_baseline(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """`delta_m` baselines that take every task from one result (e.g. `endostream eval --baseline FILE`)."""
    return {section: result for section in ("activity", "segmentation") if section in result}


def _cell(value: float | None, scale: float) -> str:
    return "N/A" if value is None else f"{value * scale:.2f}"


def markdown_table(results: Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A markdown table with one row per result, in the paper's units.

    Args:
        results: one result dict (its row is named after `meta.checkpoint`), a dict of row name -> result, or
            (row name, result) pairs, e.g. ablation rows. A Δm (%) column is added when any result carries a
            `delta_m` value.
    """
    if isinstance(results, Mapping) and ("activity" in results or "segmentation" in results):
        rows = [(str(results.get("meta", {}).get("checkpoint", "result")), results)]
    elif isinstance(results, Mapping):
        rows = [(str(name), result) for name, result in results.items()]
    else:
        rows = list(results)
    if not rows:
        raise ValueError("markdown_table needs at least one result")
    with_delta = any(result.get("delta_m") is not None for _, result in rows)
    header = ["Run"] + [column[0] for column in TABLE_COLUMNS] + (["Δm (%)"] if with_delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, result in rows:
        cells = [name.replace("|", "\\|")]
        cells += [_cell(_metric(result, section, key), scale) for _, section, key, scale in TABLE_COLUMNS]
        if with_delta:
            delta = result.get("delta_m")
            cells.append("N/A" if delta is None else f"{delta:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
