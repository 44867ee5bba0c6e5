"""`endostream train-temporal`, training side: features -> learned head + baselines -> held-out evaluation + plot.

Writes into the run folder:

    tcn/, ema/, hmm/         one head each (head.json + head.safetensors; see heads.save_head); tcn/ is the
                             learned head with the hysteresis margin the validation clips chose
    tcn_raw/                 the same TCN without hysteresis (an evaluation row, for comparison)
    train_log.json           clip set, feature store, TCN training history, baseline parameter search
    timeline.png             one test clip: ground truth, per-frame and temporal labels over time

The evaluation report is returned (the CLI adds the ONNX step latency and writes eval.json / eval.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.temporal.clips import ClipSetSpec
from training.temporal.evaluate import PER_FRAME, against_per_frame, evaluate_methods, method_predictions
from training.temporal.features import ClipFeatures, FeatureSet, build_feature_set
from training.temporal.heads import TemporalHead, save_head
from training.temporal.metrics import switches
from training.temporal.plot import plot_timeline
from training.temporal.train import TCNConfig, fit_ema, fit_hmm, fit_hysteresis, train_tcn

logger = logging.getLogger(__name__)

TIMELINE_FILE = "timeline.png"


def train_temporal(
    checkpoint: Path,
    out: Path,
    *,
    spec: ClipSetSpec | None = None,
    tcn: TCNConfig | None = None,
    task: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, TemporalHead], dict[str, Any]]:
    """Train / fit every head on clips of `spec` under the frozen `checkpoint`; save them in `out`; evaluate on test.

    Returns the heads by method and the test report (`evaluate.evaluate_methods`, plus `timings_s`).
    """
    spec, tcn = spec or ClipSetSpec(), tcn or TCNConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    data = build_feature_set(checkpoint, spec, task=task, cache_dir=cache_dir, progress=progress)
    timings["features"] = time.perf_counter() - started

    started = time.perf_counter()
    raw, tcn_log = train_tcn(data, tcn, progress=progress)
    learned, hysteresis_log = fit_hysteresis(data, raw, flicker_ratio=tcn.flicker_ratio)
    tcn_log["hysteresis"] = hysteresis_log
    timings["train_tcn"] = time.perf_counter() - started
    started = time.perf_counter()
    ema, ema_log = fit_ema(data)
    hmm, hmm_log = fit_hmm(data)
    timings["fit_baselines"] = time.perf_counter() - started
    heads: dict[str, TemporalHead] = {"ema": ema, "hmm": hmm, "tcn_raw": raw, "tcn": learned}

    meta = {
        "task": data.meta["task"],
        "classes": data.classes,
        "frame_interval_s": spec.frame_interval_s,
        "checkpoint": str(checkpoint),
        "feature_store": str(data.store),
        "fingerprint": data.meta["fingerprint"],
    }
    for name, head in heads.items():
        save_head(head, out / name, meta)

    started = time.perf_counter()
    report = evaluate_methods(data, heads, "test")
    report["val"] = evaluate_methods(data, heads, "val")["methods"]
    report["tcn_vs_per_frame"] = against_per_frame(report["methods"])
    timings["evaluate"] = time.perf_counter() - started
    clip, rows = timeline_rows(data, heads, "test")
    plot_timeline(out / TIMELINE_FILE, rows, data.classes, data.frame_interval_s, f"{clip.name} (test)")
    report["timings_s"] = timings
    report["plot"] = TIMELINE_FILE
    report["plot_clip"] = clip.name
    report["per_frame_method"] = PER_FRAME
    log = {"spec": spec.to_dict(), "feature_store": meta, "tcn": tcn_log, "ema": ema_log, "hmm": hmm_log}
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return heads, report


def timeline_rows(
    data: FeatureSet, heads: dict[str, TemporalHead], split: str
) -> tuple[ClipFeatures, dict[str, np.ndarray]]:
    """The clip of `split` with the most true label switches and its rows for the plot: ground truth, each method."""
    clips = data.split(split)
    index = max(range(len(clips)), key=lambda i: switches(clips[i].labels))
    predictions = method_predictions(data, heads, split)
    return clips[index], {"ground truth": clips[index].labels, **{k: v[index] for k, v in predictions.items()}}
