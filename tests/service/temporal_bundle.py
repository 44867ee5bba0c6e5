"""Test bundles with a temporal head, made by the real exporter (`export_onnx(..., temporal_head=...)`).

The head is the causal EMA baseline of training/temporal (`EMAFilter`) over the per-frame `activity_probs`: its
answers are predictable (`ema_reference`), so service tests can check every temporal answer exactly. Its state is the
running average; all zeros = fresh (the first step answers the frame's own probabilities).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ALPHA = 0.5  # weight of the newest frame (EMAFilter's alpha, the previous average's weight, is 1 - ALPHA)
INTERVAL = 0.1  # seconds per head step
FIELD = 7  # EMAFilter's receptive field at 0.5: steps until the oldest weight is below 1 % (0.5**7)


def export_temporal_bundle(checkpoint: Path, out: Path) -> Path:
    """Export `checkpoint` to the bundle `out` with the EMA head on its classification task; returns `out`."""
    from export.onnx_export import export_onnx
    from training.temporal.heads import EMAFilter, save_head

    labels = json.loads((checkpoint / "labels.json").read_text())
    task = next(t for t in labels["tasks"] if t["kind"] == "classification")
    meta = {"task": task["name"], "classes": task["classes"], "frame_interval_s": INTERVAL}
    head = save_head(EMAFilter(len(task["classes"]), alpha=1.0 - ALPHA), out.parent / f"{out.name}-head", meta)
    export_onnx(checkpoint, out, overwrite=True, temporal_head=head)
    return out


def ema_reference(inputs: list[np.ndarray], alpha: float = ALPHA) -> np.ndarray:
    """The EMA head's answer after stepping on `inputs` in order, from a fresh state (numpy, float64)."""
    ema = np.asarray(inputs[0], np.float64)
    for x in inputs[1:]:
        ema = ema + alpha * (np.asarray(x, np.float64) - ema)
    return ema
