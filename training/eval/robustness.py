"""Robustness to image corruptions: a checkpoint scored on every corrupted version of a split (`endostream eval
--corruptions`); the corruptions are in `corruptions.py`, the table and plot in `robustness_report.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.checkpoint import load_checkpoint
from training.data.datasets import open_dataset_at
from training.data.transforms import TaskDataset, build_eval_transform
from training.eval.corruptions import CORRUPTIONS, SEVERITIES, CorruptedDataset, corrupt_function
from training.eval.evaluate import evaluate_model
from training.eval.robustness_report import build_report, write_report

logger = logging.getLogger(__name__)


def run_robustness(
    checkpoint: Path,
    data: Path,
    out_dir: Path,
    *,
    split: str = "test",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `checkpoint` on the clean and every corrupted version of `data/split`; write the table and plot.

    Accuracy, mIoU and Dice per (corruption, severity), as Table VII and Fig. 6 report them (boundary and SSIM
    metrics are left out: they are not in the paper's robustness figures and cost most of the time).

    Args:
        out_dir: gets robustness.json, robustness.md and robustness.png.
        limit: score this many evenly spaced frames of the split (None = all).
        seed: base seed of the corruptions (and torch, for any stochastic layer).

    Returns:
        The report written to robustness.json (see `training.eval.robustness_report.build_report`).
    """
    corrupt_function()  # fail before the clean pass when the package is missing
    torch.manual_seed(seed)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    cfg.data.limit = limit
    source = open_dataset_at(data, cfg.data, split)
    transform = build_eval_transform(tuple(cfg.model.image_size))

    def score(dataset: Any) -> dict[str, float]:
        metrics = evaluate_model(
            ckpt.model, TaskDataset(dataset, transform, seed=0), ckpt.labels, batch_size=batch_size, full=False
        )
        return _headline(metrics)

    clean = score(source)
    logger.info("clean %s (%d frames): %s", split, len(source), clean)
    scores: dict[str, dict[int, dict[str, float]]] = {}
    jobs = [(name, severity) for name in corruptions for severity in severities]
    for name, severity in tqdm(jobs, desc="corruptions", disable=not progress, dynamic_ncols=True):
        scores.setdefault(name, {})[severity] = score(CorruptedDataset(source, name, severity, seed))
        logger.debug("%s severity %d: %s", name, severity, scores[name][severity])
    meta = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "frames": len(source), "seed": seed}
    report = build_report(clean, scores, meta)
    write_report(report, out_dir)
    return report


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Accuracy, mIoU and Dice of an `evaluate_model` result (the sections the model has)."""
    out = {}
    if "activity" in metrics:
        out["accuracy"] = metrics["activity"]["accuracy"]
    if "segmentation" in metrics:
        out["miou"] = metrics["segmentation"]["miou"]
        out["dice"] = metrics["segmentation"]["dice"]
    return out
