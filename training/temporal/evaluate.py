"""Evaluate per-frame and temporal predictions on held-out clips: metrics per method, a JSON report, a table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from training.temporal.features import FeatureSet
from training.temporal.heads import TemporalHead
from training.temporal.metrics import OVERLAPS, sequence_metrics
from training.temporal.train import predict

PER_FRAME = "per-frame"
COLUMNS = (
    ("frame_accuracy", "frame acc %"),
    ("macro_f1", "macro-F1 %"),
    ("edit", "edit"),
    *((f"f1@{int(round(k * 100))}", f"F1@{int(round(k * 100))}") for k in OVERLAPS),
    ("switches_per_min", "switches/min"),
    ("spurious_switches_per_min", "spurious/min"),
)


def method_predictions(data: FeatureSet, heads: Mapping[str, TemporalHead], split: str) -> dict[str, list[np.ndarray]]:
    """Method -> per-clip predicted labels on `split`: "per-frame" (argmax of the frozen model) and each head."""
    clips = data.split(split)
    out = {PER_FRAME: [c.probs.argmax(1) for c in clips]}
    for name, head in heads.items():
        out[name] = [p.argmax(1) for p in predict(head, clips)]
    return out


def evaluate_methods(data: FeatureSet, heads: Mapping[str, TemporalHead], split: str = "test") -> dict[str, Any]:
    """Metrics of every method on the clips of `split`, with what they were measured on."""
    clips = data.split(split)
    if not clips:
        raise ValueError(f"no {split!r} clips in {data.store}")
    truths = [c.labels for c in clips]
    preds = method_predictions(data, heads, split)
    methods = {name: sequence_metrics(p, truths, data.frame_interval_s) for name, p in preds.items()}
    frames = sum(len(t) for t in truths)
    return {
        "split": split,
        "clips": len(clips),
        "frames": frames,
        "minutes": frames * data.frame_interval_s / 60.0,
        "frame_interval_s": data.frame_interval_s,
        "classes": data.classes,
        "methods": methods,
    }


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per method: the metrics of `COLUMNS` and, when measured, the step latency (p50 / p95 ms)."""
    latency = report.get("latency_ms", {})
    header = ["method", *(title for _, title in COLUMNS), "step p50 / p95 ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in report["methods"].items():
        cells = [name, *(f"{metrics[key]:.1f}" if "switch" not in key else f"{metrics[key]:.2f}" for key, _ in COLUMNS)]
        lat = latency.get(name)
        cells.append(f"{lat['p50']:.3f} / {lat['p95']:.3f}" if lat else "-")
        lines.append("| " + " | ".join(cells) + " |")
    gt = next(iter(report["methods"].values()))["gt_switches_per_min"]
    lines.append("")
    lines.append(
        f"{report['clips']} held-out clips, {report['frames']} steps ({report['minutes']:.1f} min) at "
        f"{report['frame_interval_s']} s per step; ground truth: {gt:.2f} switches/min."
    )
    versus = against_per_frame(report["methods"])
    if versus is not None:
        lines.append("")
        ratio = versus["spurious_switch_reduction"]
        fewer = "no spurious switches" if ratio is None else f"{ratio:.1f}x fewer spurious switches per minute"
        gain = versus["accuracy_gain_pt"]
        lines.append(f"Learned head (tcn) against per-frame: {gain:+.1f} pt frame accuracy, {fewer}.")
    return "\n".join(lines) + "\n"


def against_per_frame(
    methods: Mapping[str, Mapping[str, float]], method: str = "tcn"
) -> dict[str, float | None] | None:
    """`method` against the per-frame model: frame accuracy gain (points) and spurious-switch reduction (a ratio;
    None when the method has no spurious switch at all); None when either method is missing."""
    if method not in methods or PER_FRAME not in methods:
        return None
    mine, base = methods[method], methods[PER_FRAME]
    spurious = mine["spurious_switches_per_min"]
    return {
        "accuracy_gain_pt": mine["frame_accuracy"] - base["frame_accuracy"],
        "spurious_switch_reduction": base["spurious_switches_per_min"] / spurious if spurious else None,
    }
