"""Per-frame features of generated clips from a frozen multi-task checkpoint, cached on disk.

The checkpoint is frozen, so a clip's features never change: like the SAK teacher cache (training/teacher_cache.py)
a store is named by a fingerprint of everything that determines its content, here the checkpoint's weights (sha256),
the classification task, the model input size, the clip set (`ClipSetSpec`) and the cache version. Any change gives
a new store; a store is reused by every later run (head training, baselines, evaluation).

Layout of `<root>/<task>-<fingerprint[:16]>/`:

    meta.json          fingerprint, checkpoint, spec, class names, feature width, split per clip
    clip_XXX.npz       features (T F float32, the pre-logit features), probs (T K float32), labels (T int64)

A clip file is written to a temporary name and renamed, so a crash never leaves a half clip; meta.json is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.checkpoint import WEIGHTS_FILE, Checkpoint, load_checkpoint
from training.models.protocol import MultiTaskModel
from training.temporal.clips import ClipSetSpec, render_temporal_clip

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/endostream/temporal_features` (`~/.cache/...` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "endostream" / "temporal_features"


@dataclass
class ClipFeatures:
    """One clip: pre-logit features, per-frame probabilities and ground-truth class indices, one row per step."""

    name: str
    split: str
    features: np.ndarray  # T F float32
    probs: np.ndarray  # T K float32
    labels: np.ndarray  # T int64


@dataclass
class FeatureSet:
    """Every clip of a spec, with the classes, the time step and where the store lives."""

    clips: list[ClipFeatures]
    classes: list[str]
    frame_interval_s: float
    store: Path
    meta: dict[str, Any]

    def split(self, name: str) -> list[ClipFeatures]:
        return [c for c in self.clips if c.split == name]

    @property
    def feature_dim(self) -> int:
        return int(self.clips[0].features.shape[1])


def classification_task(ckpt: Checkpoint, task: str | None) -> dict[str, Any]:
    """The labels.json entry of `task` (default: the checkpoint's only classification task)."""
    tasks = [t for t in ckpt.labels["tasks"] if t["kind"] == "classification"]
    if task is not None:
        tasks = [t for t in tasks if t["name"] == task]
    if len(tasks) != 1:
        names = [t["name"] for t in ckpt.labels["tasks"] if t["kind"] == "classification"]
        raise ValueError(f"task {task!r} does not name one classification task of this checkpoint: {names}")
    return tasks[0]


@torch.no_grad()
def clip_features(model: MultiTaskModel, frames: np.ndarray, task: str, batch_size: int = 64) -> tuple[np.ndarray, ...]:
    """Frames (T H W 3 uint8) -> (pre-logit features T F, probabilities T K) of `task`, in eval mode."""
    feats, probs = [], []
    for start in range(0, len(frames), batch_size):
        images = torch.from_numpy(frames[start : start + batch_size]).permute(0, 3, 1, 2)  # B 3 H W uint8
        logits, pre = model.forward_with_pre_logits(images, [task])
        feats.append(pre[task].float().numpy())
        probs.append(logits[task].float().softmax(dim=1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def store_fingerprint(checkpoint_sha256: str, task: str, size: tuple[int, int], spec: ClipSetSpec) -> str:
    body = {"version": CACHE_VERSION, "checkpoint": checkpoint_sha256, "task": task, "size": list(size)}
    body["spec"] = spec.to_dict()
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def build_feature_set(
    checkpoint: Path,
    spec: ClipSetSpec,
    *,
    task: str | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> FeatureSet:
    """Features of every clip of `spec` under `checkpoint` (frozen), rendering and extracting only missing clips.

    Args:
        checkpoint: a checkpoint directory (`RUN/best-merged` or `RUN/best`).
        spec: the clip set.
        task: the classification task (default: the checkpoint's only one).
        cache_dir: root of the stores (default `default_cache_dir()`).
        batch_size: frames per forward pass.
        progress: show a progress bar over clips.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    entry = classification_task(ckpt, task)
    size = (int(ckpt.config.model.image_size[0]), int(ckpt.config.model.image_size[1]))
    fingerprint = store_fingerprint(_sha256(checkpoint / WEIGHTS_FILE), entry["name"], size, spec)
    store = Path(cache_dir or default_cache_dir()) / f"{entry['name']}-{fingerprint[:16]}"
    store.mkdir(parents=True, exist_ok=True)
    classes = list(entry["classes"])
    splits = spec.split_of()
    model = ckpt.model.eval()
    clips: list[ClipFeatures] = []
    bar = tqdm(range(spec.clips), desc="temporal features", unit="clip", disable=not progress)
    for index in bar:
        name = f"clip_{index:03d}"
        path = store / f"{name}.npz"
        if not path.is_file():
            frames, names = render_temporal_clip(spec, index, size)
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise ValueError(f"generated activities {unknown} are not classes of {checkpoint}: {classes}")
            features, probs = clip_features(model, frames, entry["name"], batch_size)
            labels = np.array([classes.index(a) for a in names], dtype=np.int64)
            partial = path.with_suffix(".tmp.npz")
            np.savez(partial, features=features.astype(np.float32), probs=probs.astype(np.float32), labels=labels)
            partial.replace(path)
        with np.load(path) as data:
            clips.append(ClipFeatures(name, splits[index], data["features"], data["probs"], data["labels"]))
    meta = {
        "fingerprint": fingerprint,
        "checkpoint": str(checkpoint),
        "task": entry["name"],
        "classes": classes,
        "input_size": list(size),
        "feature_dim": int(clips[0].features.shape[1]),
        "spec": spec.to_dict(),
        "splits": dict(zip([c.name for c in clips], splits, strict=True)),
    }
    (store / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("temporal features: %d clips in %s", len(clips), store)
    return FeatureSet(clips, classes, spec.frame_interval_s, store, meta)
