"""Evaluate a model or checkpoint on a dataset split (used by the trainer's validation and `endostream eval`).

Segmentation is scored at each frame's own mask resolution: logits are upsampled from the model's input size to
the mask size before the argmax, so a model trained at 128 px is not flattered by low-resolution labels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data.datasets import open_dataset_at
from training.data.transforms import TaskDataset, build_eval_transform, collate
from training.eval.metrics import ClassificationMeter, SegmentationMeter
from training.eval.report import METRIC_LEGEND, delta_m, evaluation_result, load_result, markdown_table, same_baseline
from training.models.protocol import MultiTaskModel

logger = logging.getLogger(__name__)


# Result section and model-selection metric of each task kind.
SECTIONS: dict[str, tuple[str, str]] = {
    "classification": ("activity", "accuracy"),
    "segmentation": ("segmentation", "miou"),
}


def selection_score(metrics: dict[str, Any]) -> float:
    """Model-selection score on validation: mean of activity accuracy and segmentation mIoU, over the sections present
    (a single-task model is selected on its own task's metric)."""
    scores = [metrics[section][key] for section, key in SECTIONS.values() if section in metrics]
    if not scores:
        raise ValueError(f"metrics hold none of the sections {[s for s, _ in SECTIONS.values()]}: {sorted(metrics)}")
    return sum(scores) / len(scores)


def _task_of_kind(model: MultiTaskModel, kind: str) -> str | None:
    return next((task for task, k in model.task_kinds.items() if k == kind), None)


@torch.inference_mode()
def evaluate_model(
    model: MultiTaskModel,
    dataset: TaskDataset,
    labels: dict[str, Any],
    *,
    batch_size: int = 32,
    full: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Activity and segmentation metrics of `model` over `dataset` (eval transform, original-size masks).

    A single-task model (one head) gets only its own section, "activity" or "segmentation".

    Args:
        full: also compute boundary Hausdorff and SSIM (slower); False gives accuracy/F1/IoU/Dice only.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    activity_task = _task_of_kind(model, "classification")
    seg_task = _task_of_kind(model, "segmentation")
    classes = {t["name"]: t["classes"] for t in labels["tasks"]}
    activity = segmentation = None
    if activity_task is not None:
        activity = ClassificationMeter(len(classes[activity_task]), class_names=classes[activity_task])
    if seg_task is not None:
        n_seg = len(classes[seg_task])
        segmentation = SegmentationMeter(n_seg, boundary=full, ssim=full, class_names=classes[seg_task])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False, dynamic_ncols=True):
        outputs = model(batch["image"].to(device))
        if activity is not None:
            activity.update(outputs[activity_task].argmax(1).cpu().numpy(), batch["activity"].numpy())
        if segmentation is None:
            continue
        logits = outputs[seg_task].float()
        for i, target in enumerate(batch["full_mask"]):
            probs = F.interpolate(logits[i : i + 1], size=target.shape, mode="bilinear", align_corners=False)
            probs = probs.softmax(1)
            pred = probs.max(1).indices.cpu().numpy()  # ~10x faster than argmax(1) over channels on CPU
            segmentation.update(pred, np.asarray(target)[None], probs=probs.cpu().numpy() if full else None)
    model.train(was_training)
    metrics = {}
    if activity is not None:
        metrics["activity"] = activity.compute()
    if segmentation is not None:
        metrics["segmentation"] = segmentation.compute()
    return metrics


def run_evaluation(
    checkpoint: Path,
    data: Path,
    *,
    split: str = "test",
    json_out: Path | None = None,
    markdown_out: Path | None = None,
    baseline: Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
) -> dict[str, Any]:
    """`endostream eval`: load a checkpoint directory, score it on `data/split`, write JSON / markdown.

    Args:
        limit: score this many evenly spaced frames of the split (None: the checkpoint's `data.limit`, usually all).
    """
    from training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    if limit is not None:
        cfg.data.limit = limit
    dataset = TaskDataset(
        open_dataset_at(data, cfg.data, split), build_eval_transform(tuple(cfg.model.image_size)), seed=0
    )
    metrics = evaluate_model(ckpt.model, dataset, ckpt.labels, batch_size=batch_size, full=True, progress=True)
    meta = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "images": len(dataset),
        "merged": ckpt.merged,
    }
    result = evaluation_result(metrics.get("activity"), metrics.get("segmentation"), meta)
    if baseline is not None:
        result["delta_m"] = delta_m(result, same_baseline(load_result(baseline)))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    table = markdown_table([(f"{checkpoint} ({split})", result)])
    if markdown_out is not None:
        markdown_out.write_text(table + "\n\n" + "\n".join(METRIC_LEGEND) + "\n")
    logger.info("\n%s", table)
    return result
