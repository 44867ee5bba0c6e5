"""Save and load checkpoint folders (the files: `checkpoint_format.py`).

`save_checkpoint(merged=True)` folds the adapters of a copy first; `load_checkpoint` rebuilds the family's model from
config.json through the registry (without reading pretrained backbone files) and loads the weights strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.adapters.tuner import merged_copy
from training.builders.registry import build_model
from training.checkpoint_format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    LABELS_FILE,
    WEIGHTS_FILE,
    read_checkpoint_files,
    write_checkpoint_files,
)
from training.config import ExperimentConfig
from training.models.multitask import MultiTaskModule
from training.models.protocol import MultiTaskModel

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "LABELS_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]


@dataclass
class Checkpoint:
    model: MultiTaskModule
    config: ExperimentConfig
    labels: dict[str, Any]
    merged: bool
    meta: dict[str, Any]


def save_checkpoint(
    model: MultiTaskModel,
    config: ExperimentConfig,
    labels: dict[str, Any],
    out_dir: Path,
    *,
    merged: bool = False,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory; `merged=True` folds the adapters first (the model itself is untouched)."""
    to_save = merged_copy(model) if merged else model
    state = {k: v.detach().contiguous().cpu() for k, v in to_save.state_dict().items()}
    return write_checkpoint_files(state, config, labels, out_dir, merged=merged, meta=meta)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint directory and load its weights (strict)."""
    files = read_checkpoint_files(path, map_location)
    model = build_model(files.config.model, files.labels["tasks"], load_backbone_weights=False, merged=files.merged)
    try:
        model.load_state_dict(files.state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f"{files.root / WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}: {err}"
        ) from err
    return Checkpoint(model=model, config=files.config, labels=files.labels, merged=files.merged, meta=files.meta)
