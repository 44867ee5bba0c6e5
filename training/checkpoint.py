"""Checkpoint directories: `model.safetensors` + `config.json` (architecture) + `labels.json`.

Two forms share the layout (config.json `merged` tells them apart):
- unmerged: adapter factors kept (what training resumes from);
- merged: every LoRA/TESLA factor folded into per-task weights, no adapter tensor left (what export reads).
Both give the same predictions.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.adapters.tuner import iter_adapter_layers, merge_and_unload
from training.builders.shared import build_model
from training.config import ExperimentConfig, from_dict
from training.models.endoarss import EndoARSS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"


@dataclass
class Checkpoint:
    model: EndoARSS
    config: ExperimentConfig
    labels: dict[str, Any]
    merged: bool
    meta: dict[str, Any]


def merged_copy(model: EndoARSS) -> EndoARSS:
    """A copy of `model` whose backbone holds per-task merged weights and no adapter factors.

    Does not work in place: the training model keeps its adapters.
    A model without adapter layers (a family whose adaptation lives outside the backbone) is its own merged form
    and is returned as it is.
    """
    if next(iter_adapter_layers(model), None) is None:
        return model
    merged = copy.copy(model)  # shallow: share heads/SMA modules; only the backbone is replaced
    merged._modules = dict(model._modules)
    tasks = model.tasks if model.per_task_streams else model.tasks[0]
    merged._modules["backbone"] = merge_and_unload(model.backbone, tasks)
    return merged


def save_checkpoint(
    model: EndoARSS,
    config: ExperimentConfig,
    labels: dict[str, Any],
    out_dir: Path,
    *,
    merged: bool = False,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory; `merged=True` folds the adapters first (the model itself is untouched)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = merged_copy(model) if merged else model
    state = {k: v.detach().contiguous().cpu() for k, v in to_save.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    body = {
        "format_version": FORMAT_VERSION,
        "family": config.model.family,
        "merged": merged,
        "tasks": [{"name": t["name"], "kind": t["kind"], "num_classes": len(t["classes"])} for t in labels["tasks"]],
        "config": config.to_dict(),
        "meta": meta or {},
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(body, indent=2))
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    return out_dir


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint directory and load its weights (strict)."""
    root = Path(path)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, LABELS_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not an endostream checkpoint: missing {missing}; expected a directory written by "
            f"`endostream train` (e.g. RUN/best or RUN/best-merged)"
        )
    body = json.loads((root / CONFIG_FILE).read_text())
    version = body.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{root / CONFIG_FILE}: format_version {version!r} is not supported (expected 1)")
    config = from_dict(ExperimentConfig, body["config"])
    labels = json.loads((root / LABELS_FILE).read_text())
    merged = bool(body["merged"])
    model = build_model(config.model, labels["tasks"], load_backbone_weights=False, merged=merged)
    state = load_file(str(root / WEIGHTS_FILE), device=str(map_location))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{root / WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}: {err}") from err
    return Checkpoint(model=model, config=config, labels=labels, merged=merged, meta=body.get("meta", {}))
