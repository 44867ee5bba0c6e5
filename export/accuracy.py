"""Score a bundle's graph on a labelled dataset split with ONNX Runtime, as the service would run it.

Frames are resized to the bundle's input size (INTER_AREA), class maps are brought back to the label size by
nearest-neighbour resizing and scored against the full-size masks with the training metrics, so an fp32 and an INT8
graph of the same model are compared on exactly the same footing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from export.checks import onnxruntime_session
from export.manifest import Manifest
from training.config import DataConfig
from training.data.datasets import open_dataset_at
from training.eval.metrics import ClassificationMeter, SegmentationMeter


def evaluate_graph(
    graph: Path,
    manifest: Manifest,
    data: Path,
    *,
    split: str = "test",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Activity accuracy / macro F1 and segmentation mIoU / Dice of the ONNX `graph` on `data/split`.

    Args:
        graph: an ONNX file with the interface `manifest` describes (the bundle's, or a quantised copy).
    """
    session = onnxruntime_session(graph)
    dataset = open_dataset_at(data, DataConfig(format="endoarss", cache=False), split)
    tasks = {t.kind: t for t in manifest.tasks}
    activity, segmentation = tasks.get("classification"), tasks.get("segmentation")
    meters: dict[str, Any] = {}
    if activity is not None:
        meters["activity"] = ClassificationMeter(len(activity.classes), class_names=activity.classes)
    if segmentation is not None:
        meters["segmentation"] = SegmentationMeter(
            len(segmentation.classes), boundary=False, ssim=False, class_names=segmentation.classes
        )
    size = (manifest.input.width, manifest.input.height)
    names = [o.name for o in session.get_outputs()]
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"scoring {split}", disable=not progress, leave=False):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        frames = np.stack([cv2.resize(s["image"], size, interpolation=cv2.INTER_AREA) for s in samples])
        outputs = dict(zip(names, session.run(None, {manifest.input.name: frames}), strict=True))
        if activity is not None:
            predicted = outputs[activity.output].argmax(axis=1)
            meters["activity"].update(predicted, np.array([s["activity"] for s in samples]))
        if segmentation is not None:
            for sample, class_map in zip(samples, outputs[segmentation.output], strict=True):
                target = np.asarray(sample["mask"])
                full = cv2.resize(class_map, target.shape[::-1], interpolation=cv2.INTER_NEAREST)
                meters["segmentation"].update(full[None], target[None])
    scores = {name: meter.compute() for name, meter in meters.items()}
    summary: dict[str, Any] = {"split": split, "images": len(dataset)}
    if "activity" in scores:
        summary["activity_accuracy"] = scores["activity"]["accuracy"]
        summary["activity_f1_macro"] = scores["activity"]["f1_macro"]
    if "segmentation" in scores:
        summary["miou"] = scores["segmentation"]["miou"]
        summary["dice"] = scores["segmentation"]["dice"]
    return summary
